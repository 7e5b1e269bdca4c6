"""The collectives of one training step do not grow with the model: apart from the per-layer
traffic (the dispatcher's all-to-alls, tensor-parallel all-reduces, FSDP2's gathers and
reduce-scatters), a step's reductions (losses, load statistics, gradient norm) are a fixed few;
a step that is not reported (not a logging step) has only the gradient norm's.

Every c10d collective the step issues is seen by a dispatch mode (`torch.distributed` calls and
DTensor's functional collectives alike) and attributed to its Python call site."""

from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path

import pytest

from sparse_train.launch.local import run_ranks
from tests.distributed.test_layouts import _config, _data

COLLECTIVES = ("all_reduce", "allreduce", "all_gather", "allgather", "reduce_scatter", "broadcast", "all_to_all",
               "alltoall", "send", "recv", "gather", "scatter", "barrier")  # fmt: skip
# Call sites whose collectives are per-layer traffic by design: the dispatchers, our tensor-parallel
# regions and torch's (DTensor parallel styles), FSDP2, and anything the backward pass sends while
# gradients flow through those layers (the step's own reductions all come after the backward).
PER_LAYER = (
    "sparse_train/parallel/dispatch.py",
    "sparse_train/parallel/collectives.py",
    "torch/distributed/tensor/parallel/",
    "torch/distributed/fsdp/",
)
BACKWARD = "_engine_run_backward"  # torch's frame around every backward pass


def _step_collectives(cfg, run_dir: str, data) -> dict[str, dict[str, int]]:
    """Collectives of one reported and one unreported training step outside the per-layer
    traffic, by call site (op @ file:function)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from sparse_train.train.trainer import Trainer

    seen: Counter[str] = Counter()  # the step being recorded

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.name()
            if ("c10d" in name) and any(c in name for c in COLLECTIVES) and "all_to_all" not in name:
                stack = traceback.extract_stack()
                per_layer = any(p in f.filename for f in stack for p in PER_LAYER) or any(
                    f.name == BACKWARD for f in stack
                )
                if not per_layer:
                    site = next((f for f in reversed(stack) if "/sparse_train/" in f.filename), stack[-2])
                    seen[f"{name} @ {Path(site.filename).name}:{site.name}"] += 1
            return func(*args, **(kwargs or {}))

    trainer = Trainer(cfg, Path(run_dir), data=data, log=lambda msg: None)
    by_kind: dict[str, dict[str, int]] = {}
    try:
        trainer.train_step()  # warm-up: one-time setup collectives are not the step's
        for kind, report in (("reported", True), ("unreported", False)):
            seen.clear()
            with Record():
                trainer.train_step(report=report)
            by_kind[kind] = dict(seen)
    finally:
        trainer.close()
    return by_kind


LAYOUTS = {"ep2": (2, ["parallel.ep=2"]), "tp2-ep2": (4, ["parallel.tp=2", "parallel.ep=2"])}


@pytest.mark.slow  # 13 s and more: `make test` stays under 4 minutes
@pytest.mark.parametrize("layout", ["ep2", "tp2-ep2"])
def test_step_collectives_do_not_grow_with_depth(layout, tmp_path):
    world, parallel = LAYOUTS[layout]
    counts = {}
    for depth in (2, 4):
        cfg = _config([f"model.n_layers={depth}", "train.grad_accum=2"], [*parallel, "train.log_every=1"])
        counts[depth] = run_ranks(_step_collectives, world, cfg, str(tmp_path / f"d{depth}"), _data())[0]
    assert counts[2]["reported"], "the step's own reductions must be seen (losses, gradient norm)"
    assert counts[4] == counts[2], f"{layout}: step collectives by call site, depth 2 vs 4: {counts}"
    assert sum(counts[2]["reported"].values()) <= 6, counts[2]
    # unreported: the gradient norm's all-reduce alone (it also carries every rank's non-finite flag)
    assert list(counts[2]["unreported"].values()) == [1], counts[2]
    assert "global_grad_norm" in next(iter(counts[2]["unreported"])), counts[2]
