"""A probe: one measuring dry run (dryrun.run, measure=True) of a reduced-depth copy of the model
at the target world, for one tensor-parallel degree. It keeps what the planner scales to every
other layout of that degree: per unit (one block of each kind, one MTP module, the rest) the
FLOPs, the activations its forward keeps, and its tensor- and expert-parallel collectives, all
per sequence of a micro-batch; how the layout split each parameter; and the step's peak memory
by kind (docs/decisions.md, decision 53).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from sparse_train.config import Config, ModelConfig
from sparse_train.dryrun.measure import ROOT_UNIT, ParameterShard
from sparse_train.parallel.collective_record import CollectiveCall
from sparse_train.parallel.dims import ParallelDims

MTP = "mtp"
ROOT = "root"


@dataclass(frozen=True)
class BlockKind:
    """What makes blocks cost differently: a sparse FFN or not, and the attention window."""

    sparse: bool
    window: int | None

    def label(self) -> str:
        return ("sparse" if self.sparse else "dense") + (f"-window{self.window}" if self.window else "")


def block_kinds(m: ModelConfig) -> list[BlockKind]:
    """The kind of every block of the model, in order."""
    return [BlockKind(m.ffn != "dense" and m.is_sparse_layer(i), m.sliding_window(i)) for i in range(m.n_layers)]


def reduced_model(m: ModelConfig) -> tuple[ModelConfig, list[BlockKind]]:
    """The model with one block of each kind (in the order they first appear) and at most one
    MTP module; and the kinds of its blocks."""
    kinds = list(dict.fromkeys(block_kinds(m)))
    window = [k.window for k in kinds if k.window]
    attention = dataclasses.replace(
        m.attention,
        sliding_layers=[i for i, k in enumerate(kinds) if k.window] if window else m.attention.sliding_layers,
    )
    reduced = dataclasses.replace(
        m,
        n_layers=len(kinds),
        first_k_dense=0,
        sparse_layers=[i for i, k in enumerate(kinds) if k.sparse] if m.ffn != "dense" else m.sparse_layers,
        attention=attention,
        mtp_depth=min(m.mtp_depth, 1),
    )
    return reduced, kinds


@dataclass
class UnitCost:
    """One unit's cost per sequence of a micro-batch, forward and backward."""

    flops: int = 0
    activation_bytes: int = 0
    tp_calls: list[CollectiveCall] = field(default_factory=list)  # on the tensor-parallel group
    ep_calls: list[CollectiveCall] = field(default_factory=list)  # all-to-alls of the expert-parallel group

    def tp_totals(self) -> list[tuple[str, int, int]]:
        """(op, bytes, calls) of the tensor-parallel calls, per op."""
        totals: dict[str, list[int]] = {}
        for call in self.tp_calls:
            entry = totals.setdefault(call.op, [0, 0])
            entry[0] += call.nbytes
            entry[1] += 1
        return [(op, nbytes, calls) for op, (nbytes, calls) in totals.items()]

    def ep_totals(self) -> list[tuple[int, int]]:
        """(bytes, calls) of the all-to-alls."""
        return [(sum(c.nbytes for c in self.ep_calls), len(self.ep_calls))] if self.ep_calls else []


@dataclass(eq=False)  # hashed by identity: the planner caches what it derives from a probe
class Probe:
    world: int
    tp: int
    ep: int
    activation_checkpointing: str  # "none" or "all": each unit measured kept and recomputed
    units: dict[str, UnitCost]  # "blocks.0", "mtp.0", ROOT_UNIT
    unit_kinds: dict[str, BlockKind | str]  # unit -> its block kind, MTP or ROOT
    shards: list[ParameterShard]
    peak_bytes: dict[str, int]
    step_calls: list[CollectiveCall]  # the rest of the step's collectives (gradient norm, metrics)
    model_blocks: tuple[BlockKind, ...]  # the kind of every block of the whole model, in order
    model_mtp_depth: int
    seconds: float = 0.0  # how long the probe took


@dataclass
class Probes:
    """The two probes of one tensor-parallel degree: blocks keeping their activations, and recomputing them."""

    kept: Probe
    recomputed: Probe

    def unit(self, unit: str, checkpointed: bool) -> UnitCost:
        return (self.recomputed if checkpointed else self.kept).units[unit]


def probe_config(cfg: Config, world: int, tp: int, ep: int, checkpointing: str = "none") -> Config:
    """The probe's run: the reduced model, pp=1, one sequence per data-parallel rank, no accumulation."""
    reduced, _ = reduced_model(cfg.model)
    dp = world // tp
    parallel = dataclasses.replace(cfg.parallel, dp_replicate=1, dp_shard=dp, ep=ep, tp=tp, pp=1)
    train = dataclasses.replace(cfg.train, batch_size=dp, grad_accum=1, activation_checkpointing=checkpointing)
    run = dataclasses.replace(cfg, model=reduced, parallel=parallel, train=train)
    ParallelDims.from_config(run.parallel, world).check_model(run)
    return run


def run_probe(cfg: Config, world: int, tp: int, ep: int, devices_per_node: int, checkpointing: str = "none") -> Probe:
    """Measure the probe of `cfg` at `world` ranks, tensor-parallel degree `tp` (module docstring).
    Needs the fake CUDA device (dryrun.fake_cuda) loaded in this process."""
    import time

    from sparse_train.dryrun.run import dry_run

    started = time.perf_counter()
    run = probe_config(cfg, world, tp, ep, checkpointing)
    report = dry_run(
        run, world, 0, device="cuda", devices_per_node=devices_per_node, measure=True, phases_to_run=3,
        initialise=False,
    )  # fmt: skip
    if not report.ok or report.step_cost is None:
        raise RuntimeError(f"the planner's probe (tp={tp}, ep={ep}, {world} ranks) failed: {report.summary()}")
    _, kinds = reduced_model(cfg.model)
    unit_kinds: dict[str, BlockKind | str] = {f"blocks.{i}": kind for i, kind in enumerate(kinds)}
    unit_kinds.update({f"mtp.{j}": MTP for j in range(run.model.mtp_depth)})
    unit_kinds[ROOT_UNIT] = ROOT
    cost = report.step_cost
    flops, activations = cost.flops_by_unit, cost.activation_bytes_by_unit
    units = {unit: UnitCost(flops.get(unit, 0), activations.get(unit, 0)) for unit in unit_kinds}
    tp_group = tuple(range(tp))
    ep_group = tuple(range(0, ep * tp, tp))
    step_calls = []
    for call in report.collective_calls["train step"]:
        unit = units.get(call.unit)
        if unit is not None and call.ranks == tp_group and tp > 1:
            unit.tp_calls.append(call)
        elif unit is not None and "alltoall" in call.op and call.ranks == ep_group and ep > 1:
            unit.ep_calls.append(call)
        elif not _is_fsdp(call, tp, ep, world):  # FSDP's are sized from the parameters (plan.cost)
            step_calls.append(call)
    return Probe(
        world, tp, ep, checkpointing, units, unit_kinds, report.parameter_shards, dict(cost.peak_bytes), step_calls,
        tuple(block_kinds(cfg.model)), cfg.model.mtp_depth, time.perf_counter() - started,
    )  # fmt: skip


def _is_fsdp(call: CollectiveCall, tp: int, ep: int, world: int) -> bool:
    """An all-gather or reduce-scatter over the dp_shard ranks (stride tp) or the edp ranks (stride ep*tp)."""
    if not any(op in call.op for op in ("allgather", "all_gather", "reduce_scatter")):
        return False
    return call.ranks in (tuple(range(0, world, tp)), tuple(range(0, world, ep * tp)))
