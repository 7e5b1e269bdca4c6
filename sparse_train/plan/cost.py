"""A layout's memory per rank and step time, scaled from a probe of its tensor-parallel degree
(plan.probe) to the layout's depth per stage, expert and data-parallel degrees, micro-batch and
accumulation. What is measured and what is assumed (docs/scale.md states the same):

Memory of a pipeline stage's rank (each stage a kind of rank; the peak is the largest):
  parameters   this rank's FSDP shards of its blocks' parameters: each parameter's shape from the
               probe's parallelized model, split as the layout splits it (tp on its TP dimension,
               ep on the experts' first, then FSDP's dim-0 chunk over dp_shard, experts over edp)
  gradients    the same shards with one micro-batch per step; with accumulation (and under a
               pipeline) FSDP keeps the unsharded gradients until the step's one reduce-scatter
  optimizer    the probe's optimizer state per parameter byte (AdamW: 2)
  gathered     FSDP's all-gathered parameters (and, without accumulation, the gradients before
               their reduce-scatter) at the probe's peak, scaled by the largest unit gathered
  activations  each block's kept forward activations per sequence, measured, times the blocks of
               the stage, the micro-batch, and the micro-batches in flight (1F1B: pp - stage)
  temporaries  the probe's temporaries at its peak, per sequence of the micro-batch
A layout fits when the peak is within the GPU's memory less MEMORY_RESERVE (CUDA context,
NCCL buffers, allocator fragmentation).

Step time: micro-batches of a stage run one after the other; each takes its measured FLOPs at the
GPU's achievable rate, plus its tensor-parallel collectives and its all-to-alls (not overlapped:
the engine waits for them), plus the pipeline's sends, plus the part of FSDP's all-gathers that
the micro-batch's compute does not hide (FSDP prefetches the next unit while one computes). A
step of 1F1B is (accumulation + pp - 1) of the slowest stage's micro-batches; the step's
reduce-scatters overlap its last backward (2/3 of a micro-batch's compute). Collectives follow
an alpha-beta model: ring all-gather / reduce-scatter move (n-1)/n of the buffer, all-reduce
twice that, an all-to-all (n-1)/n of it, times (1 + skew) for the most loaded rank; a group that
spans nodes runs at the per-GPU network bandwidth, else at NVLink's.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import cache
from typing import Any

from sparse_train.config import Config
from sparse_train.dryrun.checks import CollectiveCall
from sparse_train.dryrun.measure import ROOT_UNIT, ParameterShard, unit_of
from sparse_train.parallel.pipeline import stage_blocks
from sparse_train.plan.hardware import GPUSpec
from sparse_train.plan.layouts import Layout
from sparse_train.plan.probe import Probe, block_kinds

MEMORY_RESERVE = 0.05  # of the GPU's memory, kept for the CUDA context, NCCL and fragmentation
BACKWARD_SHARE = 2 / 3  # of a micro-batch's compute: what the step's reduce-scatters overlap
RESIDUAL_ITEMSIZE = 4  # bytes per element of the hidden states a pipeline stage sends (fp32 residual stream)


@dataclass
class StageMemory:
    parameters: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0
    gathered: float = 0.0
    activations: float = 0.0
    temporaries: float = 0.0

    @property
    def total(self) -> float:
        return sum(asdict(self).values())


@dataclass
class StageTime:
    """Seconds per micro-batch on one stage's ranks."""

    compute: float = 0.0
    tp: float = 0.0
    ep: float = 0.0
    pp: float = 0.0
    fsdp_exposed: float = 0.0
    fsdp: float = 0.0  # all of FSDP's all-gathers, hidden or not

    @property
    def micro_batch(self) -> float:
        return self.compute + self.tp + self.ep + self.pp + self.fsdp_exposed


@dataclass
class Prediction:
    layout: Layout
    memory: list[StageMemory]  # per pipeline stage
    time: list[StageTime]  # per pipeline stage
    reduce_scatter_exposed_s: float
    step_time_s: float
    tokens_per_step: int
    flops_per_step: float  # over all ranks
    world: int
    gpu: GPUSpec
    collective_bytes: dict[str, int] = field(default_factory=dict)  # op -> bytes per step, rank 0
    reason: str | None = None

    @property
    def peak_bytes(self) -> float:
        return max(m.total for m in self.memory)

    @property
    def fits(self) -> bool:
        return self.reason is None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_time_s

    @property
    def mfu(self) -> float:
        return self.flops_per_step / (self.step_time_s * self.world * self.gpu.peak_tflops * 1e12)

    def summary(self) -> dict[str, Any]:
        """The JSON object of `sparse-train plan --json`."""
        return {
            "layout": self.layout.to_dict(),
            "name": self.layout.name(),
            "fits": self.fits,
            "reason": self.reason,
            "peak_mem_gb_per_rank": round(self.peak_bytes / 1e9, 3),
            "headroom_gb": round((self.gpu.memory_bytes - self.peak_bytes) / 1e9, 3),
            "step_time_s": round(self.step_time_s, 6),
            "tokens_per_s": round(self.tokens_per_s, 1),
            "mfu": round(self.mfu, 4),
        }

    def breakdown(self) -> dict[str, Any]:
        """`--explain`: memory and time of every stage, the collectives' bytes, the assumptions."""
        return {
            **self.summary(),
            "memory_gb_per_stage": [
                {k: round(v / 1e9, 3) for k, v in {**asdict(m), "total": m.total}.items()} for m in self.memory
            ],
            "micro_batch_time_s_per_stage": [
                {k: round(v, 6) for k, v in {**asdict(t), "micro_batch": t.micro_batch}.items()} for t in self.time
            ],
            "pipeline_micro_batches": self.layout.grad_accum + self.layout.pp - 1,
            "reduce_scatter_exposed_s": round(self.reduce_scatter_exposed_s, 6),
            "collective_bytes_per_step_rank0": self.collective_bytes,
            "gpu": asdict(self.gpu),
            "memory_reserve_fraction": MEMORY_RESERVE,
        }


def predict(
    cfg: Config, probe: Probe, layout: Layout, gpu: GPUSpec, gpus_per_node: int, skew: float = 0.0
) -> Prediction:
    """Memory and step time of `layout` (whose tp is the probe's) for `cfg` (module docstring)."""
    stages = stage_units(cfg, probe, layout.pp)
    inventory = _Inventory(probe)
    memory, times = [], []
    probe_layout = Layout(1, probe.world // probe.tp, probe.ep, probe.tp, 1, 1, 1)
    probe_units = probe_stage(probe)
    probe_params = inventory.sharded(probe_units, probe_layout)
    probe_largest = inventory.largest_unit(probe_units, probe_layout)
    peak = probe.peak_bytes
    gathered_probe = max(0, peak.get("Parameter", 0) - probe_params)
    grad_transient_probe = max(0, peak.get("Gradient", 0) - probe_params)
    opt_per_param_byte = peak.get("Optstate", 0) / probe_params if probe_params else 0.0
    root_activations = max(0, peak.get("Activation", 0) - sum(u.activation_bytes for u in probe.units.values()))
    mb = layout.micro_batch
    accumulating = layout.grad_accum > 1 or layout.pp > 1
    rs_exposed = 0.0
    for s, units in enumerate(stages):
        last = units.last
        params = inventory.sharded(units, layout)
        ratio = inventory.largest_unit(units, layout) / probe_largest if probe_largest else 1.0
        in_flight = min(layout.pp - s, layout.grad_accum)
        block_acts = sum(n * probe.units[u].activation_bytes for u, n in units.blocks().items())
        memory.append(
            StageMemory(
                parameters=params,
                gradients=inventory.unsharded(units, layout) if accumulating else params + grad_transient_probe * ratio,
                optimizer=opt_per_param_byte * params,
                gathered=gathered_probe * ratio,
                activations=mb * (block_acts * in_flight + (root_activations if last else 0)),
                temporaries=mb * peak.get("Temp", 0) + peak.get("Buffer", 0) + peak.get("Other", 0),
            )
        )
        stage_time = StageTime()
        flops = sum(n * probe.units[u].flops for u, n in units.blocks().items())
        flops += probe.units[ROOT_UNIT].flops if last else 0
        stage_time.compute = mb * flops / gpu.achievable_flops
        for unit, n in units.blocks().items():
            unit_cost, node = probe.units[unit], gpus_per_node
            stage_time.tp += n * sum(_ring_s(c.op, c.nbytes * mb, layout.tp, 1, gpu, node) for c in unit_cost.tp_calls)
            stage_time.ep += n * sum(_all_to_all_s(c.nbytes * mb, layout, gpu, node, skew) for c in unit_cost.ep_calls)
        if layout.pp > 1:
            hidden = mb * cfg.data.seq_len * cfg.model.d_model * RESIDUAL_ITEMSIZE
            inter = layout.world // layout.pp >= gpus_per_node
            sends = (0 if units.first else 1) + (0 if last else 1)  # forward's activations in, gradients out, and back
            stage_time.pp = 2 * sends * gpu.transfer_s(hidden, 1, inter)
        gathers = inventory.fsdp_groups(units, layout)
        stage_time.fsdp = sum(
            times_per_micro_batch * _ring_s("all_gather", nbytes, size, stride, gpu, gpus_per_node)
            for nbytes, size, stride, times_per_micro_batch in gathers
        )
        stage_time.fsdp_exposed = max(0.0, stage_time.fsdp - stage_time.compute)
        reduce_scatters = sum(
            _ring_s("reduce_scatter", nbytes, size, stride, gpu, gpus_per_node) for nbytes, size, stride, _ in gathers
        )
        if layout.dp_replicate > 1:  # HSDP: the shards all-reduced over the replicas once per step
            reduce_scatters += _ring_s(
                "all_reduce", inventory.sharded(units, layout, experts=False), layout.dp_replicate,
                layout.tp * layout.dp_shard, gpu, gpus_per_node,
            )  # fmt: skip
        rs_exposed = max(rs_exposed, reduce_scatters - BACKWARD_SHARE * stage_time.compute)
        times.append(stage_time)
    slowest = max(t.micro_batch for t in times)
    step = (layout.grad_accum + layout.pp - 1) * slowest + rs_exposed
    flops_per_rank_micro = [t.compute * gpu.achievable_flops for t in times]
    flops_per_step = sum(flops_per_rank_micro) * layout.grad_accum * (layout.world // layout.pp)
    prediction = Prediction(
        layout, memory, times, rs_exposed, step, layout.micro_batch * layout.dp * layout.grad_accum * cfg.data.seq_len,
        flops_per_step, layout.world, gpu,
    )  # fmt: skip
    prediction.collective_bytes = collective_bytes(probe, stages[0], layout, inventory)
    usable = gpu.memory_bytes * (1 - MEMORY_RESERVE)
    if prediction.peak_bytes > usable:
        worst = max(range(len(memory)), key=lambda s: memory[s].total)
        prediction.reason = (
            f"out of memory: stage {worst} needs {memory[worst].total / 1e9:.1f} GB per rank, "
            f"{usable / 1e9:.1f} GB usable on {gpu.name}"
        )
    return prediction


def collective_bytes(probe: Probe, units: StageUnits, layout: Layout, inventory: _Inventory) -> dict[str, int]:
    """op -> the bytes of the calls' largest tensors (dryrun.checks.CollectiveCall) of one step
    of the first stage's ranks: what `bench`/the dry run count, to compare with."""
    out: Counter[str] = Counter()
    for unit, n in units.counts.items():
        for call in probe.units[unit].tp_calls + probe.units[unit].ep_calls:
            out[collective_kind(call)] += n * call.nbytes * layout.micro_batch * layout.grad_accum
    for nbytes, size, _, times in inventory.fsdp_groups(units, layout):
        if size > 1:
            out["all_gather"] += nbytes * times * layout.grad_accum
            out["reduce_scatter"] += nbytes
    return dict(out)


def collective_kind(call: CollectiveCall) -> str:
    """all_reduce, all_gather, reduce_scatter, all_to_all, ... of a recorded call."""
    op = call.op.split("::")[-1].rstrip("_")
    return {"allreduce": "all_reduce", "alltoall_base": "all_to_all", "_allgather_base": "all_gather",
            "all_gather_into_tensor": "all_gather", "_reduce_scatter_base": "reduce_scatter",
            "reduce_scatter_tensor": "reduce_scatter", "all_to_all_single": "all_to_all"}.get(op, op)  # fmt: skip


def _ring_s(op: str, nbytes: float, size: int, stride: int, gpu: GPUSpec, gpus_per_node: int) -> float:
    """A ring collective of an `nbytes` buffer over `size` ranks `stride` apart."""
    if size <= 1:
        return 0.0
    share = (size - 1) / size * (2 if "reduce" in op and "scatter" not in op else 1)
    messages = (size - 1) * (2 if share > 1 else 1)
    return gpu.transfer_s(nbytes * share, messages, stride * size > gpus_per_node)


def _all_to_all_s(nbytes: float, layout: Layout, gpu: GPUSpec, gpus_per_node: int, skew: float) -> float:
    """One all-to-all of an `nbytes` send buffer over the ep ranks (stride tp): 1/ep of it to each
    peer, those in the node over NVLink and the others over the network at once."""
    ep = layout.ep
    if ep <= 1:
        return 0.0
    in_node = max(1, min(ep, gpus_per_node // layout.tp))
    per_peer = nbytes / ep * (1 + skew)
    intra = gpu.transfer_s(per_peer * (in_node - 1), in_node - 1, inter_node=False)
    inter = gpu.transfer_s(per_peer * (ep - in_node), ep - in_node, inter_node=True) if ep > in_node else 0.0
    return max(intra, inter)


@dataclass(frozen=True)
class StageUnits:
    """What a pipeline stage holds, in the probe's units: how many of each (a block of the full
    model counts as the probe's block of its kind; all MTP modules on the last stage), and
    whether it has the embedding (the first stage) and the final norm and head (the last)."""

    counts: dict[str, int]
    first: bool
    last: bool

    def blocks(self) -> dict[str, int]:
        return {unit: n for unit, n in self.counts.items() if unit != ROOT_UNIT}


def probe_stage(probe: Probe) -> StageUnits:
    """The probe's own model: one of each unit."""
    return StageUnits({unit: 1 for unit in probe.unit_kinds}, True, True)


def stage_units(cfg: Config, probe: Probe, pp: int) -> list[StageUnits]:
    unit_of_kind = {kind: unit for unit, kind in probe.unit_kinds.items()}
    kinds = block_kinds(cfg.model)
    stages = []
    for s, blocks in enumerate(stage_blocks(cfg.model.n_layers, pp)):
        counts: Counter[str] = Counter(unit_of_kind[kinds[i]] for i in blocks)
        if s == pp - 1:
            for unit in probe.unit_kinds:
                if unit.startswith("mtp."):
                    counts[unit] += cfg.model.mtp_depth
        counts[ROOT_UNIT] = 1
        stages.append(StageUnits(dict(counts), s == 0, s == pp - 1))
    return stages


class _Inventory:
    """The probe's parameters grouped by FSDP unit, sized under any layout of its tp degree."""

    def __init__(self, probe: Probe) -> None:
        self.groups: dict[tuple[str, str], list[ParameterShard]] = {}
        for shard in probe.shards:
            unit = unit_of(["." + shard.name])
            if unit == ROOT_UNIT:
                group = "embed" if shard.name.startswith("embed.") else "head"
            else:
                group = "experts" if shard.expert else "params"
            self.groups.setdefault((unit, group), []).append(shard)

    def _present(self, units: StageUnits) -> list[tuple[tuple[str, str], int]]:
        out = []
        for unit, group in self.groups:
            n = units.counts.get(unit, 0)
            if unit == ROOT_UNIT:
                n = int(units.first if group == "embed" else units.last)
            if n:
                out.append(((unit, group), n))
        return out

    def sharded(self, units: StageUnits, layout: Layout, experts: bool = True) -> float:
        return sum(
            n * _group_bytes(tuple(self.groups[key]), layout)[0]
            for key, n in self._present(units)
            if experts or key[1] != "experts"
        )

    def unsharded(self, units: StageUnits, layout: Layout) -> float:
        return sum(n * _group_bytes(tuple(self.groups[key]), layout)[1] for key, n in self._present(units))

    def largest_unit(self, units: StageUnits, layout: Layout) -> float:
        sizes = self._fsdp_units(units, layout)
        return max((nbytes for nbytes, *_ in sizes), default=0.0)

    def _fsdp_units(self, units: StageUnits, layout: Layout) -> list[tuple[float, int, int, int, int]]:
        """(unsharded bytes, ranks, stride, all-gathers per micro-batch, how many) per FSDP unit:
        the root (embedding and head together without a pipeline) is gathered once per
        micro-batch (FSDP keeps the root's after its forward), the others twice."""
        out = []
        present = dict(self._present(units))
        root = [key for key in present if key[0] == ROOT_UNIT]
        if root and layout.pp == 1:
            nbytes = sum(_group_bytes(tuple(self.groups[key]), layout)[1] for key in root)
            out.append((nbytes, layout.dp_shard, layout.tp, 1, 1))
        for key, n in present.items():
            if key[0] == ROOT_UNIT and layout.pp == 1:
                continue
            nbytes = _group_bytes(tuple(self.groups[key]), layout)[1]
            if key[1] == "experts":
                out.append((nbytes, layout.dp // layout.ep, layout.tp * layout.ep, 2, n))
            else:
                out.append((nbytes, layout.dp_shard, layout.tp, 1 if key[0] == ROOT_UNIT else 2, n))
        return out

    def fsdp_groups(self, units: StageUnits, layout: Layout) -> list[tuple[float, int, int, int]]:
        """(unsharded bytes, ranks, stride, all-gathers per micro-batch), one per FSDP unit of the stage."""
        units_of_stage = self._fsdp_units(units, layout)
        return [(nbytes, size, stride, times) for nbytes, size, stride, times, n in units_of_stage for _ in range(n)]


@cache
def _group_bytes(shards: tuple[ParameterShard, ...], layout: Layout) -> tuple[float, float]:
    """(this rank's shard, the all-gathered unit) in bytes, for the ranks with the most rows."""
    sharded = unsharded = 0
    for shard in shards:
        shape = list(shard.shape)
        if shard.tp_dim is not None:
            shape[shard.tp_dim] = math.ceil(shape[shard.tp_dim] / layout.tp)
        if shard.expert:
            shape[0] //= layout.ep
        ranks = layout.dp // layout.ep if shard.expert else layout.dp_shard
        rest = math.prod(shape[1:]) * shard.itemsize
        rows = math.ceil(shape[0] / ranks)
        sharded += rows * rest
        unsharded += rows * ranks * rest
    return sharded, unsharded
