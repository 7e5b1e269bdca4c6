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
               their reduce-scatter) at the probe's peak, scaled by the largest unit gathered;
               under a pipeline all of the stage's units, kept gathered for the step
  activations  each block's kept forward activations per sequence, measured (kept, or recomputed
               when the layout checkpoints its kind), times the blocks of the stage, the
               micro-batch, and the micro-batches in flight (1F1B: pp - stage). The current
               micro-batch's at the larger of two moments: the forward's end (plus the rest of
               the probe's activations at its peak: the head's), and, when some blocks
               recompute, a recomputing block's backward (its whole activations and what the
               blocks before it keep). With every block recomputed, the probe that recomputes
               measured the latter: what it holds besides its blocks' inputs
  temporaries  the probe's temporaries at its peak, per sequence of the micro-batch
A layout fits when the peak is within the GPU's memory less MEMORY_RESERVE (CUDA context,
NCCL buffers, allocator fragmentation).

Step time: micro-batches of a stage run one after the other; each takes its measured FLOPs at the
GPU's achievable rate, plus its tensor-parallel collectives and its all-to-alls (not overlapped:
the engine waits for them), plus the pipeline's sends, plus the part of FSDP's all-gathers that
the micro-batch's compute does not hide (FSDP prefetches the next unit while one computes; under
a pipeline the units are gathered once per step, spread here over its micro-batches). A
step of 1F1B is (accumulation + pp - 1) of the slowest stage's micro-batches; the step's
reduce-scatters overlap its last backward (2/3 of a micro-batch's compute; with
parallel.grad_sync=micro_batch, each overlaps its own micro-batch's backward). Collectives follow
an alpha-beta model: ring all-gather / reduce-scatter move (n-1)/n of the buffer, all-reduce
twice that, an all-to-all (n-1)/n of it, times (1 + skew) for the most loaded rank; a group that
spans nodes runs at the per-GPU network bandwidth, else at NVLink's.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cache, cached_property
from typing import Any

from sparse_train.config import Config
from sparse_train.dryrun.measure import ROOT_UNIT, ParameterShard, unit_of
from sparse_train.parallel.data import expert_shard_dim
from sparse_train.parallel.pipeline import stage_blocks
from sparse_train.plan.hardware import GPUSpec
from sparse_train.plan.layouts import Layout
from sparse_train.plan.probe import MTP, BlockKind, Probe, Probes

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
        return self.parameters + self.gradients + self.optimizer + self.gathered + self.activations + self.temporaries


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
    reason: str | None = None
    # op -> bytes per step of rank 0, computed when asked (most layouts of a plan never are)
    count_collective_bytes: Callable[[], dict[str, int]] = dict

    @cached_property
    def collective_bytes(self) -> dict[str, int]:
        return self.count_collective_bytes()

    @cached_property
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

    def time_shares(self) -> dict[str, float]:
        """The step's time by what the slowest stage spends it on: its micro-batches' compute and
        exposed communication, the pipeline's bubble, the step's exposed reduce-scatters."""
        slowest = max(self.time, key=lambda t: t.micro_batch)
        ga = self.layout.grad_accum
        shares = {
            "compute": slowest.compute * ga,
            "tp": slowest.tp * ga,
            "ep": slowest.ep * ga,
            "pp": slowest.pp * ga,
            "fsdp": slowest.fsdp_exposed * ga,
            "bubble": (self.layout.pp - 1) * slowest.micro_batch,
            "reduce_scatter": self.reduce_scatter_exposed_s,
        }
        return {k: round(v / self.step_time_s, 4) for k, v in shares.items()}

    def summary(self) -> dict[str, Any]:
        """The JSON object of `sparse-train plan --json`."""
        shares = self.time_shares()
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
            "time_shares": shares,
            "bottleneck": max((k for k in shares if k != "compute"), key=lambda k: shares[k]),
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
    cfg: Config,
    probes: Probes,
    layout: Layout,
    gpu: GPUSpec,
    gpus_per_node: int,
    skew: float = 0.0,
    model_flops_per_sequence: float | None = None,
) -> Prediction:
    """Memory and step time of `layout` (whose tp is the probes') for `cfg` (module docstring).
    MFU counts `model_flops_per_sequence` (model_flops: the model's, once), else every rank's
    FLOPs without recomputation (which counts what tensor parallelism repeats on each rank)."""
    probe = probes.kept
    stages = stage_units(probe, layout.pp)
    inventory = _inventory(probe)
    sparse_units = _sparse_units(cfg, probe)
    checkpointed = _checkpointed_units(probe, sparse_units, layout.activation_checkpointing)
    probe_layout = Layout(1, probe.world // probe.tp, probe.ep, probe.tp, 1, 1, 1)
    probe_units = probe_stage(probe)
    probe_params = inventory.sharded(probe_units, probe_layout)
    probe_largest = inventory.largest_unit(probe_units, probe_layout)
    # What is at the step's peak besides the blocks' kept activations, from the probe whose peak
    # is like this layout's: with every block recomputed, the peak comes while one recomputes
    basis = probes.recomputed if layout.activation_checkpointing == "all" else probe
    peak = basis.peak_bytes
    gathered_probe = max(0, peak.get("Parameter", 0) - probe_params)
    grad_transient_probe = max(0, peak.get("Gradient", 0) - probe_params)
    opt_per_param_byte = peak.get("Optstate", 0) / probe_params if probe_params else 0.0
    # At the peak besides the blocks' kept activations: without recomputation (forward's end) the
    # rest of the model's (head, loss); with every block recomputed (a block's backward, the
    # head's done) what the recomputing block holds, on every stage
    rest = max(0, peak.get("Activation", 0) - sum(u.activation_bytes for u in basis.units.values()))
    recomputing_all = layout.activation_checkpointing == "all"
    mb = layout.micro_batch
    # unsharded gradients kept between micro-batches (FSDP without gradient sync)
    accumulating = (layout.grad_accum > 1 and layout.grad_sync == "step") or layout.pp > 1
    reduces = layout.grad_accum if layout.grad_sync == "micro_batch" else 1  # reduce-scatters per step
    temporaries = mb * peak.get("Temp", 0) + peak.get("Buffer", 0) + peak.get("Other", 0)
    rs_exposed, useful_flops = 0.0, 0.0
    memory, times = [], []
    parts: dict[StageUnits, _StageParts] = {}  # stages holding the same blocks cost the same
    for s, units in enumerate(stages):
        if units not in parts:
            parts[units] = _stage_parts(cfg, probes, units, layout, gpu, gpus_per_node, skew, checkpointed, inventory)
        part = parts[units]
        in_flight = min(layout.pp - s, layout.grad_accum)
        ratio = part.largest_unit / probe_largest if probe_largest else 1.0
        grads = part.unsharded if accumulating else part.params + grad_transient_probe * ratio
        if in_flight > 1:
            # 1F1B: the most activations come before the stage's first backward, its gradients
            # after it, when one micro-batch's activations are gone: the peak is the larger
            grads = max(0.0, grads - part.kept_activations * mb)
        root = rest if units.last or recomputing_all else 0
        # one micro-batch's at the peak: the forward's end, or (some blocks checkpointed) while
        # one recomputes; with every block checkpointed the probe measured the latter (`rest`)
        current = part.kept_activations + root
        if not recomputing_all:
            current = max(current, part.recomputing)
        memory.append(
            StageMemory(
                parameters=part.params,
                gradients=grads,
                optimizer=opt_per_param_byte * part.params,
                # under a pipeline the stage's units stay gathered for the step (parallel.data)
                gathered=part.unsharded if layout.pp > 1 else gathered_probe * ratio,
                activations=mb * (part.kept_activations * (in_flight - 1) + current),
                temporaries=temporaries,
            )
        )
        useful_flops += part.useful_flops
        # each reduce-scatter overlaps the backward of its micro-batch (2/3 of its compute)
        rs_exposed = max(rs_exposed, reduces * max(0.0, part.reduce_scatters - BACKWARD_SHARE * part.time.compute))
        times.append(part.time)
    slowest = max(t.micro_batch for t in times)
    step = (layout.grad_accum + layout.pp - 1) * slowest + rs_exposed
    prediction = Prediction(
        layout, memory, times, rs_exposed, step, layout.micro_batch * layout.dp * layout.grad_accum * cfg.data.seq_len,
        (
            model_flops_per_sequence * layout.micro_batch * layout.dp * layout.grad_accum
            if model_flops_per_sequence is not None
            else useful_flops * layout.grad_accum * (layout.world // layout.pp)
        ),
        layout.world, gpu,
    )  # fmt: skip
    biased = cfg.model.ffn == "moe" and cfg.router.bias_update_rate > 0
    choices = cfg.moe.num_experts + cfg.moe.zero_experts + cfg.moe.copy_experts + cfg.moe.constant_experts
    prediction.count_collective_bytes = lambda: collective_bytes(
        probes, checkpointed, stages[0], layout, inventory, cfg.data.seq_len * cfg.model.d_model * RESIDUAL_ITEMSIZE,
        sparse_units, choices * 4 if biased else 0,
    )  # fmt: skip
    usable = gpu.memory_bytes * (1 - MEMORY_RESERVE)
    if prediction.peak_bytes > usable:
        worst = max(range(len(memory)), key=lambda s: memory[s].total)
        prediction.reason = (
            f"out of memory: stage {worst} needs {memory[worst].total / 1e9:.1f} GB per rank, "
            f"{usable / 1e9:.1f} GB usable on {gpu.name}"
        )
    return prediction


def model_flops(probe: Probe) -> float:
    """The FLOPs of one sequence through the whole model, forward and backward, from a probe
    without tensor parallelism (whose ranks repeat nothing) and without recomputation."""
    (units,) = stage_units(probe, 1)
    return sum(n * probe.units[unit].flops for unit, n in units.counts.items())


@dataclass
class _StageParts:
    """What a stage's ranks cost whatever their place in the pipeline (bytes, FLOPs, seconds)."""

    params: float
    unsharded: float
    largest_unit: float
    kept_activations: float  # per sequence of a micro-batch
    # per sequence: the most held while a checkpointed block recomputes in the backward (its own
    # whole activations and what the blocks before it keep; those after it are gone)
    recomputing: float
    useful_flops: float  # per micro-batch, without recomputation
    reduce_scatters: float  # seconds of one reduction of the stage's gradients
    time: StageTime


def _stage_parts(
    cfg: Config, probes: Probes, units: StageUnits, layout: Layout, gpu: GPUSpec, gpus_per_node: int,
    skew: float, checkpointed: set[str], inventory: _Inventory,
) -> _StageParts:  # fmt: skip
    probe, mb = probes.kept, layout.micro_batch
    costs = {u: (n, probes.unit(u, u in checkpointed)) for u, n in units.blocks().items()}
    root_flops = probe.units[ROOT_UNIT].flops if units.last else 0
    flops = mb * (sum(n * c.flops for n, c in costs.values()) + root_flops)  # recomputation included
    time = StageTime(compute=flops / gpu.achievable_flops)
    for n, cost in costs.values():
        for op, nbytes, calls in cost.tp_totals():
            time.tp += n * _ring_s(op, nbytes * mb, layout.tp, 1, gpu, gpus_per_node, calls)
        for nbytes, calls in cost.ep_totals():
            time.ep += n * _all_to_all_s(nbytes * mb, layout, gpu, gpus_per_node, skew, calls)
    if layout.pp > 1:
        hidden = mb * cfg.data.seq_len * cfg.model.d_model * RESIDUAL_ITEMSIZE  # one micro-batch's
        inter = layout.world // layout.pp >= gpus_per_node
        sends = (0 if units.first else 1) + (0 if units.last else 1)  # activations in and out, gradients back
        time.pp = 2 * sends * gpu.transfer_s(hidden, 1, inter)
    gathers_s, reduce_scatters = 0.0, 0.0
    for nbytes, size, stride, gathers_per_step in inventory.fsdp_groups(units, layout):
        # a ring reduce-scatter moves what the ring all-gather of the same buffer does
        ring = _ring_s("all_gather", nbytes, size, stride, gpu, gpus_per_node)
        gathers_s += gathers_per_step * ring
        reduce_scatters += ring
    time.fsdp = gathers_s / layout.grad_accum  # per micro-batch: the step's gathers spread over them
    time.fsdp_exposed = max(0.0, time.fsdp - time.compute)
    if layout.dp_replicate > 1:  # HSDP: the shards all-reduced over the replicas once per step
        reduce_scatters += _ring_s(
            "all_reduce", inventory.sharded(units, layout, experts=False), layout.dp_replicate,
            layout.tp * layout.dp_shard, gpu, gpus_per_node,
        )  # fmt: skip
    return _StageParts(
        params=inventory.sharded(units, layout),
        unsharded=inventory.unsharded(units, layout),
        largest_unit=inventory.largest_unit(units, layout),
        kept_activations=sum(n * cost.activation_bytes for n, cost in costs.values()),
        recomputing=_recomputing_peak(probes, units.order, checkpointed),
        useful_flops=mb * (sum(n * probe.units[u].flops for u, (n, _) in costs.items()) + root_flops),
        reduce_scatters=reduce_scatters,
        time=time,
    )


def _recomputing_peak(probes: Probes, order: tuple[str, ...], checkpointed: set[str]) -> float:
    """_StageParts.recomputing: the largest, over the checkpointed blocks of the stage (`order`),
    of the activations kept by the blocks before it plus its own whole activations."""
    peak, before = 0.0, 0.0
    for unit in order:
        if unit in checkpointed:
            peak = max(peak, before + probes.kept.units[unit].activation_bytes)
        before += probes.unit(unit, unit in checkpointed).activation_bytes
    return peak


def _sparse_units(cfg: Config, probe: Probe) -> set[str]:
    """The probe's units with a sparse FFN (an MTP module's block is sparse when the model's last
    block is, models.transformer)."""
    last_sparse = cfg.model.ffn != "dense" and cfg.model.is_sparse_layer(cfg.model.n_layers - 1)
    return {
        unit
        for unit, kind in probe.unit_kinds.items()
        if (kind.sparse if isinstance(kind, BlockKind) else kind == MTP and last_sparse)
    }


def _checkpointed_units(probe: Probe, sparse_units: set[str], mode: str) -> set[str]:
    """The probe's units whose blocks recompute under `mode`."""
    blocks = [unit for unit in probe.unit_kinds if unit != ROOT_UNIT]
    if mode in ("all", "none"):
        return set(blocks) if mode == "all" else set()
    return {unit for unit in blocks if (unit in sparse_units) == (mode == "sparse")}


def collective_bytes(
    probes: Probes,
    checkpointed: set[str],
    units: StageUnits,
    layout: Layout,
    inventory: _Inventory,
    sequence_hidden_bytes: int,
    sparse_units: set[str],
    bias_row_bytes: int,
) -> dict[str, int]:
    """op -> the bytes of the calls' largest tensors (parallel.collective_record) of one step
    of the first stage's ranks: what the dry run counts, to compare with."""
    out: Counter[str] = Counter()
    for unit, n in units.counts.items():
        cost = probes.unit(unit, unit in checkpointed)
        for call in cost.tp_calls + cost.ep_calls:
            out[collective_kind(call.op)] += n * call.nbytes * layout.micro_batch * layout.grad_accum
    for nbytes, size, _, gathers_per_step in inventory.fsdp_groups(units, layout):
        if size > 1:
            out["all_gather"] += nbytes * gathers_per_step
            out["reduce_scatter"] += nbytes * (layout.grad_accum if layout.grad_sync == "micro_batch" else 1)
    if layout.dp_replicate > 1:  # HSDP: the reduced shards all-reduced over the replicas
        reduces = layout.grad_accum if layout.grad_sync == "micro_batch" else 1
        out["all_reduce"] += reduces * int(inventory.sharded(units, layout, experts=False))
    if layout.pp > 1:  # activations forward, their gradients back, per micro-batch and neighbour
        hidden = layout.micro_batch * sequence_hidden_bytes * layout.grad_accum
        neighbours = int(not units.first) + int(not units.last)
        out["send"] += hidden * neighbours
        out["recv"] += hidden * neighbours
    # The step's own (gradient norm, metrics) as the probe made them, but the aux-loss-free
    # biases' counts: one [biased layers, experts] all-reduce (train.engine), as many rows as
    # the stage has sparse blocks
    probe_rows = len(sparse_units)
    stage_rows = sum(n for unit, n in units.counts.items() if unit in sparse_units)
    for call in probes.kept.step_calls:
        nbytes = call.nbytes
        if bias_row_bytes and probe_rows and nbytes == probe_rows * bias_row_bytes:
            nbytes = stage_rows * bias_row_bytes
        out[collective_kind(call.op)] += nbytes
    return dict(out)


def collective_kind(op: str) -> str:
    """all_reduce, all_gather, reduce_scatter, all_to_all, ... of a recorded call's op."""
    op = op.split("::")[-1].rstrip("_")
    return {"allreduce": "all_reduce", "alltoall_base": "all_to_all", "_allgather_base": "all_gather",
            "all_gather_into_tensor": "all_gather", "_reduce_scatter_base": "reduce_scatter",
            "reduce_scatter_tensor": "reduce_scatter", "all_to_all_single": "all_to_all"}.get(op, op)  # fmt: skip


def _ring_s(op: str, nbytes: float, size: int, stride: int, gpu: GPUSpec, gpus_per_node: int, calls: int = 1) -> float:
    """`calls` ring collectives of `nbytes` buffers in all over `size` ranks `stride` apart."""
    if size <= 1:
        return 0.0
    twice = "reduce" in op and "scatter" not in op  # an all-reduce: a reduce-scatter and an all-gather
    share = (size - 1) / size * (2 if twice else 1)
    messages = calls * (size - 1) * (2 if twice else 1)
    return gpu.transfer_s(nbytes * share, messages, stride * size > gpus_per_node)


def _all_to_all_s(
    nbytes: float, layout: Layout, gpu: GPUSpec, gpus_per_node: int, skew: float, calls: int = 1
) -> float:
    """`calls` all-to-alls of `nbytes` send buffers in all over the ep ranks (stride tp): 1/ep of
    each to every peer, those in the node over NVLink and the others over the network at once."""
    ep = layout.ep
    if ep <= 1:
        return 0.0
    in_node = max(1, min(ep, gpus_per_node // layout.tp))
    per_peer = nbytes / ep * (1 + skew)
    intra = gpu.transfer_s(per_peer * (in_node - 1), calls * (in_node - 1), inter_node=False)
    inter = gpu.transfer_s(per_peer * (ep - in_node), calls * (ep - in_node), inter_node=True) if ep > in_node else 0.0
    return max(intra, inter)


@dataclass(frozen=True)
class StageUnits:
    """What a pipeline stage holds, in the probe's units: how many of each (a block of the full
    model counts as the probe's block of its kind; all MTP modules on the last stage), and
    whether it has the embedding (the first stage) and the final norm and head (the last)."""

    counts: dict[str, int]
    first: bool
    last: bool
    order: tuple[str, ...] = ()  # its blocks and MTP modules in forward order, as probe units

    def __hash__(self) -> int:
        return hash((tuple(sorted(self.counts.items())), self.first, self.last, self.order))

    def blocks(self) -> dict[str, int]:
        return {unit: n for unit, n in self.counts.items() if unit != ROOT_UNIT}


def probe_stage(probe: Probe) -> StageUnits:
    """The probe's own model: one of each unit."""
    blocks = tuple(unit for unit in probe.unit_kinds if unit != ROOT_UNIT)
    return StageUnits({unit: 1 for unit in probe.unit_kinds}, True, True, blocks)


@cache
def _inventory(probe: Probe) -> _Inventory:
    return _Inventory(probe)


@cache
def stage_units(probe: Probe, pp: int) -> list[StageUnits]:
    """The units on each of `pp` stages of the probed model, in the order they run."""
    unit_of_kind = {kind: unit for unit, kind in probe.unit_kinds.items()}
    stages = []
    kinds = probe.model_blocks
    for s, blocks in enumerate(stage_blocks(len(kinds), pp)):
        order = [unit_of_kind[kinds[i]] for i in blocks]
        if s == pp - 1:
            order += [unit for unit in probe.unit_kinds if unit.startswith("mtp.")] * probe.model_mtp_depth
        counts: Counter[str] = Counter(order)
        counts[ROOT_UNIT] = 1
        stages.append(StageUnits(dict(counts), s == 0, s == pp - 1, tuple(order)))
    return stages


class _Inventory:
    """The probe's parameters grouped by FSDP unit, sized under any layout of its tp degree."""

    def __init__(self, probe: Probe) -> None:
        self.groups: dict[tuple[str, str], list[ParameterShard]] = {}
        self._bytes: dict[tuple[tuple[str, str], int, int, int, int], tuple[float, float]] = {}
        for shard in probe.shards:
            unit = unit_of(["." + shard.name])
            if unit == ROOT_UNIT:
                group = "embed" if shard.name.startswith("embed.") else "head"
            else:
                group = "experts" if shard.expert else "params"
            self.groups.setdefault((unit, group), []).append(shard)

    def group_bytes(self, key: tuple[str, str], layout: Layout) -> tuple[float, float]:
        """(this rank's shard, the all-gathered unit) of one group, cached per split."""
        split = (key, layout.tp, layout.ep, layout.dp_shard, layout.dp)
        if split not in self._bytes:
            self._bytes[split] = _group_bytes(self.groups[key], layout)
        return self._bytes[split]

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
            n * self.group_bytes(key, layout)[0] for key, n in self._present(units) if experts or key[1] != "experts"
        )

    def unsharded(self, units: StageUnits, layout: Layout) -> float:
        return sum(n * self.group_bytes(key, layout)[1] for key, n in self._present(units))

    def largest_unit(self, units: StageUnits, layout: Layout) -> float:
        sizes = self._fsdp_units(units, layout)
        return max((nbytes for nbytes, *_ in sizes), default=0.0)

    def _fsdp_units(self, units: StageUnits, layout: Layout) -> list[tuple[float, int, int, int, int]]:
        """(unsharded bytes, ranks, stride, all-gathers per step, how many) per FSDP unit. Without a
        pipeline a unit is gathered for each micro-batch's forward and again for its backward,
        the root (embedding and head together) once per micro-batch (FSDP keeps the root's
        gathered from forward to backward); under a pipeline every unit stays gathered for the
        whole step (parallel.data): once per step."""
        out = []
        present = dict(self._present(units))
        ga = layout.grad_accum
        pipelined = layout.pp > 1
        root = [key for key in present if key[0] == ROOT_UNIT]
        if root and not pipelined:
            nbytes = sum(self.group_bytes(key, layout)[1] for key in root)
            out.append((nbytes, layout.dp_shard, layout.tp, ga, 1))
        for key, n in present.items():
            if key[0] == ROOT_UNIT and not pipelined:
                continue
            nbytes = self.group_bytes(key, layout)[1]
            gathers = 1 if pipelined else 2 * ga
            if key[1] == "experts":
                out.append((nbytes, layout.dp // layout.ep, layout.tp * layout.ep, gathers, n))
            else:
                out.append((nbytes, layout.dp_shard, layout.tp, gathers, n))
        return out

    def fsdp_groups(self, units: StageUnits, layout: Layout) -> list[tuple[float, int, int, int]]:
        """(unsharded bytes, ranks, stride, all-gathers per step), one per FSDP unit of the stage."""
        return [unit[:4] for unit in self._fsdp_units(units, layout) for _ in range(unit[4])]


def _group_bytes(shards: list[ParameterShard], layout: Layout) -> tuple[float, float]:
    """(this rank's shard, the all-gathered unit) in bytes, for the ranks with the most: FSDP's
    dim-0 chunks padded to a multiple of the ranks, experts on the dimension parallel.data picks."""
    sharded = unsharded = 0
    for shard in shards:
        shape = list(shard.shape)
        if shard.tp_dim is not None:
            shape[shard.tp_dim] = math.ceil(shape[shard.tp_dim] / layout.tp)
        ranks, dim = layout.dp_shard, 0
        if shard.expert:
            shape[0] //= layout.ep
            ranks = layout.dp // layout.ep
            dim = expert_shard_dim(tuple(shape), {0} | ({shard.tp_dim} if shard.tp_dim is not None else set()), ranks)
        rest = math.prod(shape) // shape[dim] * shard.itemsize
        rows = math.ceil(shape[dim] / ranks)
        sharded += rows * rest
        unsharded += rows * ranks * rest
    return sharded, unsharded
