"""The planner against real runs on local gloo processes.

- Memory (`sparse-train bench plan --gloo`): a layout's predicted peak memory per rank beside what
  the same run uses (`sparse-train bench memory`'s measurement: a rank's peak resident set after
  two steps, less the same process's run of a tiny model in the same layout).
- Collectives (`sparse-train bench plan --collectives`): the predicted bytes of each collective
  kind in a step (all-to-all, FSDP's all-gathers and reduce-scatters, TP's and HSDP's
  all-reduces, pipeline sends) beside each rank's in the same run with balanced routing
  (`sparse-train bench dispatch`'s routing; every call recorded as the dry run records it):
  equal, byte for byte.

The memory runs' processes start with glibc's allocator untuned (decision 13 keeps freed memory
in the heap, which a resident set then counts; docs/benchmarks.md, "Memory per rank"): every
allocation above 128 KiB is its own mapping, given back on free, so the resident set follows
the live tensors.
Their routing is the model's own (random at initialisation), not balanced: a rank whose experts
draw more tokens holds more, which the planner does not predict (its skew is a time figure).
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any
from unittest import mock

from sparse_train.config import Config, compose_config
from sparse_train.plan import validate
from sparse_train.plan.cost import collective_kind
from sparse_train.plan.hardware import GPUSpec
from sparse_train.plan.layouts import Layout
from sparse_train.plan.probe import Probes
from sparse_train.plan.validate import over_layouts, predicted_run

MB = 2**20

# Two models whose training memory (40-100 MB per rank) is well above a resident set's noise (a
# few MB), and which train a step on 4 processes in seconds. The MLA model's value heads are as
# wide as its query/key heads (48): with narrower ones, torch's CPU attention falls back to the
# math kernel (it keeps the [S, S] probabilities), where a GPU, which the planner predicts, runs
# a fused one
MODELS = {
    "moe-d256": ("configs/tiny-moe.yaml", ["data.seq_len=512", "model.max_seq_len=512", "model.d_model=256",
                                           "model.n_layers=4", "model.sparse_every_n=2", "moe.kernel_backend=torch"]),
    "deepseek-d256": ("configs/tiny-deepseek-v3.yaml", ["data.seq_len=512", "model.max_seq_len=512",
                                                        "model.d_model=256", "model.n_layers=4",
                                                        "model.attention.v_head_dim=48", "moe.kernel_backend=torch"]),
}  # fmt: skip
LAYOUTS = {  # as plan.validate.LAYOUTS
    "moe-d256": [
        (1, 4, 2, 1, 1, 2, 1, "none"), (1, 2, 2, 2, 1, 2, 1, "none"), (1, 2, 2, 1, 2, 2, 2, "none"),
        (2, 2, 2, 1, 1, 2, 1, "all"), (1, 4, 2, 1, 1, 2, 1, "sparse"), (1, 4, 2, 1, 1, 2, 2, "none", "micro_batch"),
        (1, 4, 2, 1, 1, 2, 2, "all"),
    ],
    "deepseek-d256": [
        (1, 4, 4, 1, 1, 1, 1, "none"), (1, 2, 2, 2, 1, 1, 1, "sparse"), (1, 4, 2, 1, 1, 1, 2, "dense"),
        (1, 2, 2, 1, 2, 1, 2, "none"),
    ],
}  # fmt: skip

# glibc's defaults where runtime.MALLOC_ENV tunes them, and torch's huge-page alignment off
UNTUNED_ALLOCATOR = {
    "MALLOC_MMAP_THRESHOLD_": str(128 << 10),
    "MALLOC_TRIM_THRESHOLD_": str(128 << 10),
    "MALLOC_TOP_PAD_": "0",
    "THP_MEM_ALLOC_ENABLE": "0",
}


def gloo_table(gpu: GPUSpec, gpus_per_node: int = 8, log: Any = print, timeout: float = 900) -> list[dict[str, Any]]:
    """`compare_with_gloo` over MODELS x LAYOUTS (the probes need the fake CUDA device loaded)."""
    return over_layouts(
        MODELS,
        LAYOUTS,
        lambda cfg, layout, probes: compare_with_gloo(cfg, layout, gpu, gpus_per_node, probes, timeout),
        log,
    )


def compare_with_gloo(
    cfg: Config,
    layout: Layout,
    gpu: GPUSpec,
    gpus_per_node: int,
    probes: dict[tuple[int, int], Probes] | None = None,
    timeout: float = 900,
) -> dict[str, Any]:
    """The predicted peak memory of each rank of `layout` (its stage's) and the measured one, MB.
    `probes` ((world, tp) -> Probes) is filled and reused across calls."""
    from sparse_train.bench import memory as bench_memory

    run, prediction = predicted_run(cfg, layout, gpu, gpus_per_node, probes)
    measured_run = compose_config(run.to_dict(), [*bench_memory.QUIET, "train.steps=2", "train.device=cpu"])
    # the environment the spawned ranks start with (glibc reads it once, at process start)
    with mock.patch.dict(os.environ, UNTUNED_ALLOCATOR):
        ranks = bench_memory.launch(
            layout.world, bench_memory.baseline_config(measured_run, layout.world), measured_run, timeout
        )
    per_stage = layout.world // layout.pp
    predicted = [prediction.memory[rank // per_stage].total / MB for rank in range(layout.world)]
    measured = [run["step_peak_mb"] - baseline["step_peak_mb"] for baseline, run in ranks]
    return {
        "layout": layout.name(),
        "world": layout.world,
        "predicted_peak_mb": round(max(predicted), 2),
        "measured_peak_mb": round(max(measured), 2),
        "memory_error": max(predicted) / max(measured) - 1,
        "predicted_mb_per_rank": [round(p, 2) for p in predicted],
        "measured_mb_per_rank": [round(m, 2) for m in measured],
    }


def collectives_table(gpu: GPUSpec, gpus_per_node: int = 8, log: Any = print) -> list[dict[str, Any]]:
    """`compare_collectives` over plan.validate's models and layouts."""
    return over_layouts(
        validate.MODELS, validate.LAYOUTS,
        lambda cfg, layout, probes: compare_collectives(cfg, layout, gpu, gpus_per_node, probes), log,
    )  # fmt: skip


def compare_collectives(
    cfg: Config,
    layout: Layout,
    gpu: GPUSpec,
    gpus_per_node: int,
    probes: dict[tuple[int, int], Probes] | None = None,
) -> dict[str, Any]:
    """The predicted bytes of each collective kind in one step of a first-stage rank of
    `layout`, and each first-stage rank's in a real run with balanced routing. `probes` as
    compare_with_gloo's."""
    from sparse_train.bench.dispatch import balanced_step_collectives

    run, prediction = predicted_run(cfg, layout, gpu, gpus_per_node, probes)
    predicted = prediction.collective_bytes
    with tempfile.TemporaryDirectory(prefix="sparse-train-collectives-") as tmp:
        config = Path(tmp) / "run.yaml"
        config.write_text(run.to_yaml())
        ranks = balanced_step_collectives(str(config), layout.world)
    measured = []
    for by_op in ranks[: layout.world // layout.pp]:  # the pipeline's stages are rank blocks
        kinds: Counter[str] = Counter()
        for op, nbytes in by_op.items():
            kinds[collective_kind(op)] += nbytes
        measured.append(dict(sorted(kinds.items())))
    return {
        "layout": layout.name(),
        "world": layout.world,
        "predicted_collective_bytes": dict(sorted(predicted.items())),
        "measured_collective_bytes_per_rank": measured,
        "exact": all(m == predicted for m in measured),
    }
