"""FFF leaves sharded across ranks like experts, on 2 and 4 real gloo processes.

Every rank routes its own tokens through the (replicated) tree; the sharded layer must give
each rank exactly what the unsharded layer gives on that rank's tokens (outputs, input and
node gradients, the master leaf's), and each leaf's gradient must be the sum over all ranks'
tokens of the unsharded gradient. Covered: the three training modes, both dispatchers, and
every token descending to leaf 0 (the other ranks receive nothing).
"""

from __future__ import annotations

import copy

import pytest
import torch

from sparse_train.launch.local import run_ranks

CASES = [
    # (name, mode, activation, dispatcher, all tokens to leaf 0)
    ("hard-swiglu-alltoall", "hard", "swiglu", "alltoall", False),
    ("topk-gelu-alltoall", "topk_paths", "gelu", "alltoall", False),
    ("soft-swiglu-allgather", "soft", "swiglu", "allgather", False),
    ("hard-gelu-allgather", "hard", "gelu", "allgather", False),
    ("hard-all-to-leaf-0", "hard", "swiglu", "alltoall", True),
]
LEAF_PARAMS = {"swiglu": ("w_gate_up", "w_down"), "gelu": ("w_in", "w_out")}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-3))


def _layer_cases(cases: list[tuple]) -> dict[str, dict[str, float]]:
    import torch.distributed as dist

    from sparse_train.config import FFFConfig, ParallelConfig
    from sparse_train.models.fff import FFFLayer
    from sparse_train.parallel.expert import apply_expert_parallel
    from tests.distributed.ep_group import init_expert_parallel

    rank, world, dims, meshes = init_expert_parallel()
    out = {}
    for name, mode, act, dispatcher, to_leaf_0 in cases:
        torch.manual_seed(0)
        cfg = FFFConfig(
            depth=3,
            leaf_width=8,
            mode=mode,
            top_k=3,
            leaf_activation=act,
            master_leaf=True,
            kernel_backend="torch",
            hardening_coef=0.1,
        )
        layer = FFFLayer(16, cfg)
        with torch.no_grad():
            for p in layer.parameters():
                p.normal_(0, 0.3)
            if to_leaf_0:
                layer.tree.node_bias.fill_(-100.0)  # every decision goes left
        reference = copy.deepcopy(layer)
        apply_expert_parallel(layer, dims, meshes, ParallelConfig(ep_dispatcher=dispatcher))
        g = torch.Generator().manual_seed(100 + rank)
        x, probe = torch.randn(2, 9, 16, generator=g), torch.randn(2, 9, 16, generator=g)
        results = []
        for module in (layer, reference):
            xi = x.clone().requires_grad_()
            y, aux = module(xi)
            ((y * probe).sum() + aux.objective).backward()
            results.append((y.detach(), xi.grad, module.tree.node_weight.grad, module.master_logit.grad))
        diffs = {key: _rel(a, b) for key, a, b in zip(("y", "dx", "nodes", "blend"), *results, strict=True)}
        per = 8 // world
        for pname in LEAF_PARAMS[act]:
            ref_grad = getattr(reference.experts, pname).grad.clone()
            dist.all_reduce(ref_grad)
            local = getattr(layer.experts, pname).grad.to_local()
            diffs[pname] = _rel(local, ref_grad[rank * per : (rank + 1) * per])
        diffs["received_rows"] = float(layer.dispatcher.stats.received_rows)
        out[name] = diffs
    return out


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])  # 4 processes: slow suite
def test_sharded_leaves_match_the_unsharded_layer(world):
    per_rank = run_ranks(_layer_cases, world, CASES)
    for rank, results in enumerate(per_rank):
        for name, r in results.items():
            for key, value in r.items():
                if key != "received_rows":
                    assert value < 1e-5, f"rank {rank} {name}: {key} differs by {value} (relative)"
    skewed = [per_rank[r]["hard-all-to-leaf-0"]["received_rows"] for r in range(world)]
    assert skewed[0] > 0 and all(rows == 0 for rows in skewed[1:]), "leaf 0 lives on rank 0: only it receives"
