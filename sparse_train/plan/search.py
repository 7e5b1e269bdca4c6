"""The planner: every layout the trainer accepts for a cluster, one probe per tensor-parallel
degree, every layout predicted from its probe (plan.cost), ranked: the layouts that fit first,
fastest first."""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from sparse_train.config import Config, ConfigError
from sparse_train.errors import UsageError
from sparse_train.plan.cost import MEMORY_RESERVE, Prediction, model_flops, predict
from sparse_train.plan.hardware import GPUSpec
from sparse_train.plan.layouts import Layout, candidate_layouts, check_layout
from sparse_train.plan.probe import Probe, Probes, probe_config, run_probe


@dataclass
class Plan:
    gpus: int
    gpus_per_node: int
    gpu: GPUSpec
    predictions: list[Prediction]  # best first
    rejected: dict[str, int] = field(default_factory=dict)  # the trainer's reason -> layouts
    probes: list[Probe] = field(default_factory=list)

    @property
    def best(self) -> Prediction | None:
        return self.predictions[0] if self.predictions and self.predictions[0].fits else None


def accepted_layouts(cfg: Config, gpus: int, gpus_per_node: int, sequences: int) -> tuple[list[Layout], dict[str, int]]:
    """The candidates the trainer's validation accepts, and how many it refused for each reason."""
    accepted, rejected = [], {}
    verdicts: dict[Layout, str | None] = {}  # checkpointing changes no verdict: one check per layout
    for layout in candidate_layouts(cfg, gpus, gpus_per_node, sequences):
        base = dataclasses.replace(layout, activation_checkpointing="none")
        if base not in verdicts:
            verdicts[base] = check_layout(cfg, base)[1]
        why = verdicts[base]
        if why is None:
            accepted.append(layout)
        else:
            rejected[why] = rejected.get(why, 0) + 1
    return accepted, rejected


def probe_ep(cfg: Config, gpus: int, tp: int, layouts: list[Layout]) -> int:
    """The expert-parallel degree of a probe: the median of those the layouts of `tp` use that
    the probe's own layout (pp=1, all other ranks data-parallel) admits. Per-rank activations and
    FLOPs do not depend on it under balanced routing; parameters are sized per layout."""
    options = sorted({layout.ep for layout in layouts if layout.tp == tp and (gpus // tp) % layout.ep == 0})
    for ep in options[len(options) // 2 :] + options[: len(options) // 2][::-1]:
        try:
            probe_config(cfg, gpus, tp, ep)
        except ConfigError:
            continue
        return ep
    return 1


def layout_probes(cfg: Config, layout: Layout, gpus_per_node: int, measured: dict[tuple[int, int], Probes]) -> Probes:
    """The probes a prediction of `layout` scales from: measured once per (world, tp) into
    `measured`, at the expert-parallel degree `probe_ep` picks for this one layout."""
    key = (layout.world, layout.tp)
    if key not in measured:
        ep = probe_ep(cfg, layout.world, layout.tp, [layout])
        measured[key] = Probes(
            *(run_probe(cfg, layout.world, layout.tp, ep, gpus_per_node, mode) for mode in ("none", "all"))
        )
    return measured[key]


def make_plan(
    cfg: Config,
    gpus: int,
    gpus_per_node: int,
    gpu: GPUSpec,
    sequences: int,
    *,
    skew: float = 0.0,
    log: Callable[[str], None] = lambda msg: None,
) -> Plan:
    """Rank every accepted layout of `cfg` on `gpus` GPUs for `sequences` per step (module docstring).
    Needs the fake CUDA device loaded in this process (dryrun.fake_cuda)."""
    layouts, rejected = accepted_layouts(cfg, gpus, gpus_per_node, sequences)
    if not layouts:
        raise UsageError(no_layout(cfg, gpus, gpus_per_node, sequences, rejected))
    tps = sorted({layout.tp for layout in layouts})
    jobs = [(tp, probe_ep(cfg, gpus, tp, layouts), mode) for tp in tps for mode in ("none", "all")]
    log(
        f"probing {len(jobs)} reduced-depth runs on {gpus} fake ranks (tp {', '.join(map(str, tps))}; "
        "blocks keeping and recomputing activations) ..."
    )
    measured = dict(zip(jobs, _run_probes(cfg, gpus, gpus_per_node, jobs), strict=True))
    probes = {tp: Probes(measured[(tp, ep, "none")], measured[(tp, ep, "all")]) for tp, ep, _ in jobs}
    per_sequence = model_flops(probes[1].kept) if 1 in probes else None
    predictions = [
        predict(cfg, probes[layout.tp], layout, gpu, gpus_per_node, skew, per_sequence) for layout in layouts
    ]
    predictions.sort(key=lambda p: (not p.fits, -p.tokens_per_s if p.fits else p.peak_bytes))
    return Plan(gpus, gpus_per_node, gpu, predictions, rejected, list(measured.values()))


def _run_probes(cfg: Config, gpus: int, gpus_per_node: int, jobs: list[tuple[int, int, str]]) -> list[Probe]:
    """The probes, on as many processes as there are cores (each is one single-threaded dry run;
    the children inherit this process's environment, the fake CUDA device's included)."""
    workers = min(len(jobs), os.cpu_count() or 1)
    if workers <= 1:
        return [run_probe(cfg, gpus, tp, ep, gpus_per_node, mode) for tp, ep, mode in jobs]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_probe, cfg, gpus, tp, ep, gpus_per_node, mode) for tp, ep, mode in jobs]
        return [future.result() for future in futures]


def no_layout(cfg: Config, gpus: int, gpus_per_node: int, sequences: int, rejected: dict[str, int]) -> str:
    if not rejected:
        # the fewest data-parallel ranks any (tp, pp) leaves: a batch must be a multiple of some dp
        fewest = min(
            gpus // (tp * pp)
            for tp in range(1, gpus_per_node + 1)
            for pp in range(1, cfg.model.n_layers + 1)
            if gpus % (tp * pp) == 0 and gpus_per_node % tp == 0
        )
        return (
            f"plan: a global batch of {sequences} sequences splits over no data-parallel degree of {gpus} GPUs "
            f"(tp <= {gpus_per_node}, pp <= {cfg.model.n_layers} blocks): the smallest that does is {fewest} "
            f"sequences ({fewest * cfg.data.seq_len} tokens)"
        )
    reason = max(rejected, key=lambda r: rejected[r])
    return f"plan: the trainer accepts no layout of {gpus} GPUs for this model and batch; most often: {reason}"


def smallest_cluster_estimate(plan: Plan) -> int | None:
    """The GPUs (whole nodes) on which the closest layout would fit, if its parameters,
    optimizer state and sharded gradients shrink with the data-parallel ranks and the rest
    (activations, gathered units, temporaries, gradients kept unsharded) stays: an estimate (a
    plan on that many GPUs checks it); None when the rest alone does not fit."""
    closest = min(plan.predictions, key=lambda p: p.peak_bytes)
    usable = plan.gpu.memory_bytes * (1 - MEMORY_RESERVE)
    worst = max(closest.memory, key=lambda m: m.total)
    layout = closest.layout
    unsharded_grads = layout.pp > 1 or (layout.grad_accum > 1 and layout.grad_sync == "step")
    shrinking = worst.parameters + worst.optimizer + (0.0 if unsharded_grads else worst.gradients)
    fixed = worst.total - shrinking
    if fixed >= usable:
        return None
    needed = plan.gpus * shrinking / (usable - fixed)
    return max(plan.gpus + plan.gpus_per_node, math.ceil(needed / plan.gpus_per_node) * plan.gpus_per_node)
