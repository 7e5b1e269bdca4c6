"""The planner against real runs: a layout's predicted peak memory per rank beside what the same
run uses when it trains on local gloo processes (`sparse-train bench memory`'s measurement: a
rank's peak resident set after two steps, less the same process's run of a tiny model in the same
layout). `sparse-train bench plan --gloo`.

The processes run with glibc's allocator untuned (decision 13 keeps freed memory in the heap,
which a resident set then counts; docs/benchmarks.md, "Memory per rank"): every allocation above
128 KiB is its own mapping, given back on free, so the resident set follows the live tensors.
Routing is the model's own (random at initialisation), not balanced: a rank whose experts draw
more tokens holds more, which the planner does not predict (its skew is a time figure).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from sparse_train.config import Config, compose_config
from sparse_train.plan.cost import predict
from sparse_train.plan.hardware import GPUSpec
from sparse_train.plan.layouts import Layout, check_layout
from sparse_train.plan.probe import Probes, run_probe
from sparse_train.plan.search import probe_ep

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
    from sparse_train.config import load_config

    rows = []
    for model, (config, overrides) in MODELS.items():
        cfg = load_config(config, overrides)
        probes: dict[tuple[int, int], Probes] = {}
        for fields in LAYOUTS[model]:
            row = {"model": model, **compare_with_gloo(cfg, Layout(*fields), gpu, gpus_per_node, probes, timeout)}
            log(row)
            rows.append(row)
    return rows


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

    run, why = check_layout(cfg, layout)
    if run is None:
        raise ValueError(f"{layout.name()}: the trainer refuses it: {why}")
    probes = {} if probes is None else probes
    key = (layout.world, layout.tp)
    if key not in probes:
        ep = probe_ep(cfg, layout.world, layout.tp, [layout])
        probes[key] = Probes(
            *(run_probe(cfg, layout.world, layout.tp, ep, gpus_per_node, mode) for mode in ("none", "all"))
        )
    prediction = predict(cfg, probes[key], layout, gpu, gpus_per_node)
    measured_run = compose_config(run.to_dict(), [*bench_memory.QUIET, "train.steps=2", "train.device=cpu"])
    with _untuned_allocator():
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


@contextlib.contextmanager
def _untuned_allocator() -> Iterator[None]:
    """The environment the spawned ranks start with (glibc reads it once, at process start)."""
    saved = {k: os.environ.get(k) for k in UNTUNED_ALLOCATOR}
    os.environ.update(UNTUNED_ALLOCATOR)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
