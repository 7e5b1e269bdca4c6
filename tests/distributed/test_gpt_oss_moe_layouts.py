"""gpt-oss's MoE options (router bias, expert biases, clamped activation) under EP and TP.

The experts' down bias is the part a layout can get wrong: under TP the experts' outputs are
partial sums over the TP ranks, so a bias added inside them would count tp times; it is added
after that sum instead, replicated over TP and sharded with the experts over EP. Shown on real
gloo processes, two ways:

  - the layer: each rank's outputs, input and router gradients equal the unsharded layer's on
    the same tokens, and each sharded expert parameter's gradient (gathered whole) equals the
    unsharded one summed over the data-parallel ranks' tokens; ep=2 (both dispatchers), tp=2,
    and ep=2 x tp=2 on 4 processes;
  - a tiny model through the Trainer (FSDP, gradient reduction and clipping included): the
    losses, gradient norms, first-step gradients and final weights of ep=2 and tp=2 (and, in
    the slow suite, tp=2 x ep=2 and ep=2 with 2 FSDP replicas per expert slice) equal one
    process's. This is where a parameter used outside the experts' forward shows: FSDP has
    resharded it by then, so its gradient skips the reduction (the down bias's was 2x under ep=2).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
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
STEPS = 3
BASE = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.ffn_hidden=64",
    "moe.num_experts=4",
    "moe.expert_hidden=32",
    "moe.kernel_backend=torch",
    "moe.expert_activation=gpt_oss",
    "moe.expert_limit=1.0",  # small enough that the clamps bind at initialisation
    "moe.expert_bias=true",
    "router.bias=true",
    "router.top_k=2",
    "router.balance_scope=global_batch",
    "train.batch_size=4",
    "train.grad_accum=2",
    f"train.steps={STEPS}",
    "optimizer.warmup_steps=1",
    "optimizer.eps=1e-6",
    "checkpoint.every=0",
    "checkpoint.save_final=false",
]
TRAINER_LAYOUTS = {
    # name: (processes, parallel overrides)
    "ep2": (2, ["parallel.ep=2"]),
    "tp2": (2, ["parallel.tp=2"]),
    "tp2-ep2": (4, ["parallel.tp=2", "parallel.ep=2"]),
    "ep2-edp2": (4, ["parallel.ep=2"]),  # dp_shard=4: each expert slice FSDP-sharded over 2 ranks
}
FAST = {"ep2", "tp2"}  # 4 processes on 2 cores: the slow suite


def _data():
    from sparse_train.data.dataset import TokenData

    rng = np.random.default_rng(0)
    return TokenData(
        rng.integers(0, 32, 30_000).astype(np.uint16), rng.integers(0, 32, 4_000).astype(np.uint16), "random tokens"
    )


def _train(cfg, run_dir: str, data):
    """(per-step losses, gradient norms, first step's gradients, final weights), whole; on rank 0."""
    from sparse_train.train.trainer import Trainer

    trainer = Trainer(cfg, Path(run_dir), data=data, log=lambda msg: None)
    first_grads: dict[str, torch.Tensor] = {}

    def record_first_gradients(optimizer, args, kwargs) -> None:
        if not first_grads:
            first_grads.update(trainer.engine.full_gradients())

    trainer.optimizer.register_step_pre_hook(record_first_gradients)
    records = [trainer.train_step() for _ in range(STEPS)]
    weights = trainer.engine.full_state_dict()
    trainer.metrics.close()
    losses, norms = [r["loss"] for r in records], [r["grad_norm"] for r in records]
    return (losses, norms, first_grads, weights) if trainer.is_main else None


def _assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(got) == sorted(want), f"{what}: different parameter names"
    for name, ref in want.items():
        err = float((got[name].double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))
        assert err <= 1e-5, f"{what} of {name}: relative error {err:.2e} > 1e-5"


@pytest.mark.parametrize(
    "layout", [pytest.param(n, marks=[] if n in FAST else [pytest.mark.slow]) for n in TRAINER_LAYOUTS]
)
def test_gpt_oss_moe_trainer_layout_matches_single_process(layout, tmp_path):
    from tests.conftest import tiny_config

    world, parallel = TRAINER_LAYOUTS[layout]
    data = _data()
    ref_losses, ref_norms, ref_grads, ref_weights = _train(tiny_config(*BASE), str(tmp_path / "single"), data)
    losses, norms, grads, weights = run_ranks(
        _train, world, tiny_config(*BASE, *parallel), str(tmp_path / layout), data
    )[0]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=f"{layout}: per-step losses")
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-5, err_msg=f"{layout}: per-step gradient norms")
    for name in ("router.bias", "experts.b_gate_up", "experts.b_down"):
        assert any(k.endswith(name) for k in ref_grads), f"the model must hold {name}"
    _assert_same_tensors(grads, ref_grads, f"{layout}: first-step gradient")
    _assert_same_tensors(weights, ref_weights, f"{layout}: final weight")
