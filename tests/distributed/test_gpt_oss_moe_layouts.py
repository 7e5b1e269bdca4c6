"""gpt-oss's MoE options (router bias, expert biases, clamped activation) under EP and TP.

The experts' down bias is the part a layout can get wrong: under TP the experts' outputs are
partial sums over the TP ranks, so a bias added inside them would count tp times; it is added
after that sum instead, replicated over TP and sharded with the experts over EP. Shown on real
gloo processes, two ways:

  - the layer: each rank's outputs, input and router gradients equal the unsharded layer's on
    the same tokens, and each sharded expert parameter's gradient (gathered whole) equals the
    unsharded one summed over the data-parallel ranks' tokens; ep=2 (both dispatchers), tp=2,
    and ep=2 x tp=2 on 4 processes;
  - a tiny model through the Trainer: the `*-gpt-oss-moe` layouts of test_layouts.py (ep=2,
    tp=2; tp=2 x ep=2 and ep=2 with 2 FSDP replicas per expert slice in the slow suite). That is
    where a parameter used outside the experts' forward shows: FSDP has resharded it by then, so
    its gradient skips the reduction (the down bias's was 2x under ep=2).
"""

from __future__ import annotations

import copy

import pytest
import torch

from sparse_train.launch.local import run_ranks

D = 16
GPT_OSS_MOE = dict(expert_activation="gpt_oss", expert_limit=1.0, expert_bias=True, kernel_backend="torch")
EXPERT_PARAMS = ("w_gate_up", "w_down", "b_gate_up", "b_down")


def _build_layer():
    from sparse_train.config import MoEConfig, RouterConfig
    from sparse_train.models.moe import MoELayer

    torch.manual_seed(0)
    moe = MoEConfig(num_experts=4, expert_hidden=8, **GPT_OSS_MOE)
    layer = MoELayer(D, moe, RouterConfig(top_k=2, bias=True, renormalize=True))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)  # biases too: zero ones would hide a bias counted twice
    return layer


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-3))


def _layer_layouts(ep: int, tp: int, dispatchers: list[str]) -> dict[str, dict[str, float]]:
    import torch.distributed as dist

    from sparse_train.config import ParallelConfig
    from sparse_train.parallel.dims import ParallelDims
    from sparse_train.parallel.expert import apply_expert_parallel

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dims = ParallelDims(dp_replicate=1, dp_shard=world // tp, ep=ep, tp=tp, pp=1, world_size=world)
    meshes = dims.build_meshes("cpu")
    dp_rank = rank // tp  # the TP ranks of one data-parallel rank share its tokens
    out = {}
    for dispatcher in dispatchers:
        layer = _build_layer()
        reference = copy.deepcopy(layer)
        apply_expert_parallel(layer, dims, meshes, ParallelConfig(ep_dispatcher=dispatcher))
        g = torch.Generator().manual_seed(100 + dp_rank)
        x, probe = torch.randn(2, 7, D, generator=g), torch.randn(2, 7, D, generator=g)
        results = []
        for module in (layer, reference):
            xi = x.clone().requires_grad_()
            y, aux = module(xi)
            ((y * probe).sum() + aux.lb_loss + aux.z_loss).backward()
            results.append((y.detach(), xi.grad, module.router.weight.grad, module.router.bias.grad))
        (y, dx, dw, db), (y_ref, dx_ref, dw_ref, db_ref) = results
        diffs = {"y": _rel(y, y_ref), "dx": _rel(dx, dx_ref), "router.weight": _rel(dw, dw_ref)}
        diffs["router.bias"] = _rel(db, db_ref)
        for name in EXPERT_PARAMS:
            ref_grad = getattr(reference.experts, name).grad.clone()
            if dims.dp > 1:
                dist.all_reduce(ref_grad, group=meshes.dp.get_group())  # every data-parallel rank's tokens
            diffs[f"experts.{name}"] = _rel(getattr(layer.experts, name).grad.full_tensor(), ref_grad)
        out[dispatcher] = diffs
    dist.destroy_process_group()
    return out


LAYER_LAYOUTS = {
    # name: (processes, ep, tp, dispatchers)
    "ep2": (2, 2, 1, ["alltoall", "allgather"]),
    "tp2": (2, 1, 2, ["alltoall"]),  # no EP: the dispatcher stays local
    "ep2-tp2": (4, 2, 2, ["alltoall", "allgather"]),
}


@pytest.mark.parametrize("layout", LAYER_LAYOUTS)
def test_gpt_oss_moe_layer_matches_unsharded_layer(layout):
    world, ep, tp, dispatchers = LAYER_LAYOUTS[layout]
    per_rank = run_ranks(_layer_layouts, world, ep, tp, dispatchers)
    for rank, results in enumerate(per_rank):
        for dispatcher, diffs in results.items():
            for key, err in diffs.items():
                assert err < 1e-5, f"{layout} rank {rank} {dispatcher}: {key} differs by {err:.2e} (relative)"


# ---- the Trainer: a tiny model, one process vs ep=2 and tp=2 -----------------------------------
