"""Expert parallelism at the layer level, on 2 and 4 real gloo processes.

Every rank routes its own tokens; the sharded layer must give each rank exactly what the
unsharded layer gives on that rank's tokens (outputs, input and router gradients), and each
expert's gradient must be the sum over all ranks' tokens of the unsharded gradient. Covered:
both dispatchers, deduplication on and off, dropless and capacity modes, ranks that receive no
token at all, and every token routed to one expert.
"""

from __future__ import annotations

import copy

import pytest
import torch

from sparse_train.launch.local import run_ranks

CASES = [
    # (name, dispatcher, dedup, capacity_factor, skew)
    ("alltoall-dedup", "alltoall", True, None, False),
    ("alltoall-no-dedup", "alltoall", False, None, False),
    ("alltoall-capacity", "alltoall", True, 1.0, False),
    ("alltoall-all-to-one-expert", "alltoall", True, None, True),
    ("alltoall-all-to-one-expert-capacity", "alltoall", True, 0.5, True),
    ("allgather", "allgather", True, None, False),
    ("allgather-all-to-one-expert", "allgather", True, None, True),
]


def _build_layer(capacity_factor, skew: bool):
    from sparse_train.config import MoEConfig, RouterConfig
    from sparse_train.models.moe import MoELayer

    torch.manual_seed(0)
    moe = MoEConfig(num_experts=8, expert_hidden=12, capacity_factor=capacity_factor, kernel_backend="torch")
    layer = MoELayer(16, moe, RouterConfig(top_k=2, renormalize=True))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
        if skew:  # feature 0 is large for every token: every token picks expert 0, then expert 1
            layer.router.weight[:, 0] = -5.0
            layer.router.weight[0, 0] = 5.0
            layer.router.weight[1, 0] = 4.5
    return layer


def _rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Largest difference relative to the reference's scale (gradients summed over many tokens are large)."""
    return (a - b).abs().max() / b.abs().max().clamp_min(1e-3)


def _layer_cases(cases: list[tuple]) -> dict[str, dict[str, float]]:
    import torch.distributed as dist

    from sparse_train.config import ParallelConfig
    from sparse_train.parallel.expert import apply_expert_parallel
    from tests.distributed.ep_group import init_expert_parallel

    rank, world, dims, meshes = init_expert_parallel()
    out = {}
    for name, dispatcher, dedup, capacity, skew in cases:
        layer = _build_layer(capacity, skew)
        reference = copy.deepcopy(layer)
        apply_expert_parallel(layer, dims, meshes, ParallelConfig(ep_dispatcher=dispatcher, ep_dedup=dedup))
        g = torch.Generator().manual_seed(100 + rank)
        x = torch.randn(2, 9, 16, generator=g)
        if skew:
            x[..., 0] = 3.0 + x[..., 0].abs()
        probe = torch.randn(2, 9, 16, generator=g)
        results = []
        for module in (layer, reference):
            xi = x.clone().requires_grad_()
            y, aux = module(xi)
            ((y * probe).sum() + aux.lb_loss + aux.z_loss).backward()
            results.append((y.detach(), xi.grad, module.router.weight.grad))
        (y, dx, dr), (y_ref, dx_ref, dr_ref) = results
        # expert gradients: the sharded layer's local experts vs the all-rank sum of the reference's
        per = 8 // world
        diffs = {"y": _rel(y, y_ref), "dx": _rel(dx, dx_ref), "router": _rel(dr, dr_ref)}
        for pname in ("w_gate_up", "w_down"):
            ref_grad = getattr(reference.experts, pname).grad.clone()
            dist.all_reduce(ref_grad)
            local = getattr(layer.experts, pname).grad.to_local()
            diffs[pname] = _rel(local, ref_grad[rank * per : (rank + 1) * per])
        out[name] = {k: float(v) for k, v in diffs.items()}
        stats = layer.dispatcher.stats
        out[name]["bytes_sent"], out[name]["bytes_min"] = stats.bytes_sent, stats.bytes_min
        out[name]["received_rows"] = float(stats.received_rows)
        # what the exchange must cost, counted from the routing itself: rows of 16 fp32, there and back
        routing = reference.route(x.reshape(-1, 16))
        kept = routing.kept_Tk if routing.kept_Tk is not None else torch.ones_like(routing.experts_Tk, dtype=torch.bool)
        dest_Tk = routing.experts_Tk // per
        remote = kept & (dest_Tk != rank)
        pairs = {(t, int(dest_Tk[t, j])) for t, j in remote.nonzero().tolist()}
        out[name]["expected_remote_assignments"] = 2 * 64 * int(remote.sum())
        out[name]["expected_remote_pairs"] = 2 * 64 * len(pairs)
    return out


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])  # 4 processes: slow suite
def test_expert_parallel_layer_matches_unsharded_layer(world):
    per_rank = run_ranks(_layer_cases, world, CASES)
    for rank, results in enumerate(per_rank):
        for name, r in results.items():
            for key in ("y", "dx", "router", "w_gate_up", "w_down"):
                assert r[key] < 1e-5, f"rank {rank} {name}: {key} differs by {r[key]} (relative)"
    skewed = [per_rank[r]["alltoall-all-to-one-expert"] for r in range(world)]
    assert skewed[0]["received_rows"] > 0 and all(s["received_rows"] == 0 for s in skewed[1:]), (
        "with every token routed to experts 0 and 1 (both on rank 0), the other ranks receive nothing"
    )
    for rank in range(world):
        dedup, plain = per_rank[rank]["alltoall-dedup"], per_rank[rank]["alltoall-no-dedup"]
        # deduplicated: one row per (token, remote rank) = the minimum; otherwise one per assignment
        assert dedup["bytes_sent"] == dedup["bytes_min"] == dedup["expected_remote_pairs"] > 0
        assert plain["bytes_sent"] == plain["expected_remote_assignments"]
        assert plain["bytes_min"] == dedup["bytes_min"]
    assert sum(per_rank[r]["alltoall-no-dedup"]["received_rows"] for r in range(world)) > sum(
        per_rank[r]["alltoall-dedup"]["received_rows"] for r in range(world)
    ), "some token has two experts on one rank: without deduplication that rank receives it twice"
