"""The planner against the trainer: a layout's prediction (scaled from the reduced-depth probes)
beside the dry run of that very layout (full depth, its pipeline, accumulation and checkpointing:
the real trainer on fake tensors), for the rank the planner calls the largest. Peak memory and
the bytes of every collective kind of a step, side by side (`sparse-train bench plan`).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from typing import Any

from sparse_train.config import Config
from sparse_train.plan.cost import Prediction, collective_kind, predict
from sparse_train.plan.hardware import GPUSpec
from sparse_train.plan.layouts import Layout, check_layout
from sparse_train.plan.probe import Probes
from sparse_train.plan.search import layout_probes

# Two models (a small MoE with dense and sparse blocks; DeepSeek-V3's architecture in small: MLA,
# shared experts, a dense first block) and layouts of 4 ranks: every parallel degree, pipeline,
# HSDP, micro-batch, accumulation, each checkpointing choice and gradient sync.
MODELS = {
    "tiny-moe": ("configs/tiny-moe.yaml", ["data.seq_len=256", "model.max_seq_len=256", "model.n_layers=4",
                                            "model.sparse_every_n=2", "moe.kernel_backend=torch"]),
    "tiny-deepseek-v3": ("configs/tiny-deepseek-v3.yaml", ["model.n_layers=5", "moe.kernel_backend=torch"]),
}  # fmt: skip
LAYOUTS = {  # (dp_replicate, dp_shard, ep, tp, pp, micro-batch, accumulation, checkpointing[, gradient sync])
    "tiny-moe": [
        (1, 4, 2, 1, 1, 1, 1, "none"), (1, 4, 4, 1, 1, 2, 2, "none"), (1, 2, 2, 2, 1, 1, 1, "none"),
        (1, 2, 2, 1, 2, 1, 2, "none"), (2, 2, 2, 1, 1, 1, 1, "all"), (1, 4, 2, 1, 1, 1, 1, "sparse"),
        (1, 4, 2, 1, 1, 1, 2, "none", "micro_batch"), (1, 4, 2, 1, 1, 1, 2, "all"), (2, 2, 2, 1, 1, 1, 2, "all"),
    ],
    "tiny-deepseek-v3": [
        (1, 2, 2, 2, 1, 1, 1, "sparse"), (1, 4, 4, 1, 1, 2, 2, "none"), (1, 4, 2, 1, 1, 1, 1, "dense"),
        (2, 2, 2, 1, 1, 1, 1, "none"),
    ],
}  # fmt: skip


def validation_table(gpu: GPUSpec, gpus_per_node: int = 8, log: Any = print) -> list[dict[str, Any]]:
    """`compare` over MODELS x LAYOUTS (needs the fake CUDA device loaded in this process)."""
    return over_layouts(
        MODELS, LAYOUTS, lambda cfg, layout, probes: compare(cfg, layout, gpu, gpus_per_node, probes), log
    )


def over_layouts(
    models: dict[str, tuple[str, list[str]]],
    layouts: dict[str, list[tuple]],
    compare_one: Callable[[Config, Layout, dict[tuple[int, int], Probes]], dict[str, Any]],
    log: Any,
) -> list[dict[str, Any]]:
    """One row per model and layout (the model's probes measured once, shared by its rows),
    each logged as it comes."""
    from sparse_train.config import load_config

    rows = []
    for model, (config, overrides) in models.items():
        cfg = load_config(config, overrides)
        probes: dict[tuple[int, int], Probes] = {}
        for fields in layouts[model]:
            row = {"model": model, **compare_one(cfg, Layout(*fields), probes)}
            log(row)
            rows.append(row)
    return rows


def predicted_run(
    cfg: Config, layout: Layout, gpu: GPUSpec, gpus_per_node: int, probes: dict[tuple[int, int], Probes] | None
) -> tuple[Config, Prediction]:
    """`layout`'s run config and the planner's prediction of it. `probes` ((world, tp) -> Probes)
    is filled and reused across calls."""
    run, why = check_layout(cfg, layout)
    if run is None:
        raise ValueError(f"{layout.name()}: the trainer refuses it: {why}")
    probes_of_layout = layout_probes(cfg, layout, gpus_per_node, {} if probes is None else probes)
    return run, predict(cfg, probes_of_layout, layout, gpu, gpus_per_node)


def compare(
    cfg: Config,
    layout: Layout,
    gpu: GPUSpec,
    gpus_per_node: int,
    probes: dict[tuple[int, int], Probes] | None = None,
) -> dict[str, Any]:
    """Predicted and measured peak memory (bytes) and collective bytes per kind for `layout`.
    `probes` as predicted_run's."""
    from sparse_train.dryrun.run import dry_run

    run, prediction = predicted_run(cfg, layout, gpu, gpus_per_node, probes)
    stage = max(range(layout.pp), key=lambda s: prediction.memory[s].total)
    rank = stage * (layout.world // layout.pp)  # the stage's first rank
    report = dry_run(
        run, layout.world, rank, device="cuda", devices_per_node=gpus_per_node,
        measure=True, phases_to_run=3, initialise=False,
    )  # fmt: skip
    if not report.ok or report.step_cost is None:
        raise RuntimeError(f"{layout.name()}: the dry run failed: {report.summary()}")
    measured: Counter[str] = Counter()
    for call in report.collective_calls["train step"]:
        measured[collective_kind(call.op)] += call.nbytes
    predicted_bytes = prediction.collective_bytes if stage == 0 else {}
    return {
        "layout": layout.name(),
        "world": layout.world,
        "rank": rank,
        "predicted_peak_bytes": prediction.memory[stage].total,
        "measured_peak_bytes": report.step_cost.peak_total,
        "memory_error": prediction.memory[stage].total / report.step_cost.peak_total - 1,
        "predicted_collective_bytes": predicted_bytes,
        "measured_collective_bytes": dict(measured) if stage == 0 else {},
        "predicted_memory": dataclasses.asdict(prediction.memory[stage]),
        "measured_memory": report.step_cost.peak_bytes,
        # FLOPs back from seconds at the achievable rate: rounded (the float round trip is not exact)
        "predicted_flops": round(prediction.time[stage].compute * gpu.achievable_flops * layout.grad_accum),
        "measured_flops": report.step_cost.flops,
    }
