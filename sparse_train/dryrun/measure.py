"""What one training step costs a rank, measured on the fake tensors of a dry run: the peak
device memory by kind (torch's MemTracker: parameters, gradients, optimizer state, activations,
temporaries, buffers), the FLOPs of its operators (FlopCounterMode), and both per unit of the
model (a block, an MTP module, or the rest: embedding, final norm, head), which a planner scales
to other depths. The real trainer runs; nothing is allocated and no kernel runs, so a rank of a
1,000-GPU layout measures in seconds.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch.distributed._tools.mem_tracker import MemTracker

ROOT_UNIT = ""  # the model's parts outside its blocks and MTP modules
_UNIT = re.compile(r"\.((?:blocks|mtp)\.\d+)(?:\.|$)")


@dataclass(frozen=True)
class ParameterShard:
    """How the layout split one parameter: what a planner needs to size it under other layouts."""

    name: str
    shape: tuple[int, ...]  # the whole parameter's
    itemsize: int
    tp_dim: int | None  # the dimension tensor parallelism splits (None: replicated over tp)
    expert: bool  # on the expert mesh: dimension 0 split over ep, then sharded over edp


def parameter_shards(model: Any) -> list[ParameterShard]:
    """Every parameter of a parallelized model, with how its layout splits it (module docstring)."""
    from torch.distributed.tensor import DTensor, Shard

    out = []
    for name, param in model.named_parameters():
        dims: tuple[str, ...] = ()
        tp_dim = None
        if isinstance(param, DTensor):
            dims = tuple(param.device_mesh.mesh_dim_names or ())
            for dim_name, placement in zip(dims, param.placements, strict=True):
                if isinstance(placement, Shard) and dim_name == "tp":  # _StridedShard is a Shard
                    tp_dim = placement.dim
        out.append(ParameterShard(name, tuple(param.shape), param.element_size(), tp_dim, "edp" in dims))
    return out


@dataclass
class StepCost:
    peak_bytes: dict[str, int] = field(default_factory=dict)  # kind -> bytes at the device's peak
    flops: int = 0
    flops_by_unit: dict[str, int] = field(default_factory=dict)  # unit -> FLOPs (forward and backward)
    activation_bytes_by_unit: dict[str, int] = field(default_factory=dict)  # unit -> kept by its forward

    @property
    def peak_total(self) -> int:
        return self.peak_bytes.get("Total", 0)


def unit_of(module_names: Iterable[str]) -> str:
    """The unit ("blocks.3", "mtp.0", or ROOT_UNIT) of the innermost of the modules running now,
    named as torch's module trackers name them ("Transformer.blocks.3.ffn")."""
    for name in sorted(module_names, key=len, reverse=True):
        if match := _UNIT.search(name):
            return match.group(1)
    return ROOT_UNIT


class KeptActivations:
    """The bytes each unit's forward keeps for its backward, counted where autograd saves them
    (saved-tensor hooks) in the first micro-batch: each storage once (views share it), the
    parameters' storages left out (the weights are counted as parameters), and a checkpointed
    block's arguments counted with its unit (the checkpoint holds them; nothing saved inside a
    checkpointed block stays). MemTracker's per-module differences are not used for this: they
    count FSDP's all-gather buffers of the units inside a block as the block's activations."""

    def __init__(self, model: Any, units: UnitTracker) -> None:
        self.model, self.units = model, units
        self.bytes: dict[str, int] = {}
        self._seen: set[int] = set()

    def keep(self, tensor: Any) -> None:
        import torch
        from torch.distributed.tensor import DTensor
        from torch.multiprocessing.reductions import StorageWeakRef

        if self.units.backward_started or not isinstance(tensor, torch.Tensor):
            return
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        key = StorageWeakRef(local.untyped_storage()).cdata
        if key in self._seen:
            return
        self._seen.add(key)
        if key not in self._parameter_storages():
            unit = self.units.current
            self.bytes[unit] = self.bytes.get(unit, 0) + local.untyped_storage().nbytes()

    def keep_all(self, values: Any) -> None:
        from torch.utils._pytree import tree_flatten

        for value in tree_flatten(values)[0]:
            self.keep(value)

    def _parameter_storages(self) -> set[int]:
        from torch.distributed.tensor import DTensor
        from torch.multiprocessing.reductions import StorageWeakRef

        return {
            StorageWeakRef((p.to_local() if isinstance(p, DTensor) else p).untyped_storage()).cdata
            for p in self.model.parameters()
        }

    @contextmanager
    def counting(self) -> Iterator[None]:
        import torch

        from sparse_train.models import recompute

        def pack(tensor: Any) -> Any:
            self.keep(tensor)
            return tensor

        recompute.checkpoint_input_observers.append(self.keep_all)
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                yield
        finally:
            recompute.checkpoint_input_observers.remove(self.keep_all)


class UnitTracker:
    """Which unit of the model runs now, forward and backward: a unit's forward pre-hook starts
    it, and the gradient of its output starts its backward (units run one after the other, the
    backward in reverse; the rest of the model is ROOT_UNIT, except the embedding's backward,
    which follows the first block's and is counted with it). torch's module trackers do not
    follow our backward (their stale entries name a unit whose backward ended long before).
    `on_switch(previous_unit)` runs at every change, to close the previous unit's account."""

    def __init__(self, model: Any, on_switch: Callable[[str], None]) -> None:
        from torch.utils._pytree import tree_flatten

        self.current, self.backward, self.backward_started = ROOT_UNIT, False, False
        self._handles = []
        self._on_switch = on_switch
        for name, module in model.named_modules():
            if not _UNIT.fullmatch("." + name):
                continue
            self._handles.append(module.register_forward_pre_hook(lambda m, a, unit=name: self._switch(unit, False)))

            def ended(module: Any, args: Any, output: Any, unit: str = name) -> None:
                self._switch(ROOT_UNIT, False)
                grads = [t for t in tree_flatten(output)[0] if getattr(t, "requires_grad", False)]
                if grads:
                    grads[0].register_hook(lambda grad: self._switch(unit, True))

            self._handles.append(module.register_forward_hook(ended))

    def _switch(self, unit: str, backward: bool) -> None:
        self._on_switch(self.current)
        self.current, self.backward = unit, backward
        self.backward_started |= backward

    def close(self) -> None:
        self._on_switch(self.current)
        for handle in self._handles:
            handle.remove()


class _StepMemTracker(MemTracker):
    """torch's MemTracker for a step of several micro-batches: its per-module statistics are
    for one forward each, so they are cleared before the next micro-batch's (MemTracker refuses
    a module's second forward otherwise); the step's peak is all that is read of it."""

    def _pre_fw_hook(self, module: Any, inputs: Any) -> None:
        if module in self.memory_tracking and not self._mod_tracker.is_bw:
            name = self._mod_tracker.get_known_fqn(module)
            if set(self._mod_tracker.parents) - {name} == {"Global"}:  # the model again: a new micro-batch
                self.reset_mod_stats()
        super()._pre_fw_hook(module, inputs)


class _NoModules:
    """FlopCounterMode's module tracker, tracking nothing: every FLOP goes to "Global"."""

    parents = frozenset({"Global"})

    def __enter__(self) -> _NoModules:
        return self

    def __exit__(self, *args: object) -> None: ...


def _flop_counter() -> Any:
    """FlopCounterMode without its module tracker. That tracker puts gradient hooks on every
    module's inputs and outputs; in a checkpointed block's recomputation those hooks keep the
    recomputed tensors alive to the step's end (measured: one process of a small MoE, every
    block checkpointed, a step's peak of 118.8 MB with the tracker, 76.1 MB without, 72.5 MB of
    resident set). The units are attributed by UnitTracker instead."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _NoModules()
    return counter


@contextmanager
def measured_step(trainer: Any, device: str, cost: StepCost, checks: Any = None) -> Iterator[None]:
    """Track `trainer`'s model and optimizer while the block runs; fill `cost` when it ends.
    `checks` (dryrun.checks.Checks): its collective calls are then tagged with their unit."""
    tracker = _StepMemTracker()
    tracker.track_external(trainer.model, trainer.optimizer)
    flops = _flop_counter()
    counted = [0]

    def account(unit: str) -> None:
        total = flops.get_total_flops()
        cost.flops_by_unit[unit] = cost.flops_by_unit.get(unit, 0) + int(total - counted[0])
        counted[0] = total

    units = UnitTracker(trainer.model, account)
    kept = KeptActivations(trainer.model, units)
    if checks is not None:
        checks.unit_of_call = lambda: units.current
    try:
        with tracker, flops, kept.counting():
            yield
            units.close()
    finally:
        if checks is not None:
            checks.unit_of_call = None
    for dev, snapshot in tracker.get_tracker_snapshot("peak").items():
        if str(dev).startswith(device):
            cost.peak_bytes = {str(getattr(kind, "value", kind)): int(v) for kind, v in snapshot.items()}
    cost.flops = int(flops.get_total_flops())
    cost.activation_bytes_by_unit = {unit: n for unit, n in kept.bytes.items() if unit != ROOT_UNIT}


def measuring(
    run: Callable[[], Any], trainer_of: Callable[[], Any], device: str, cost: StepCost, checks: Any = None
) -> Callable[[], Any]:
    """`run` (a dry-run phase) measured into `cost`."""

    def phase() -> Any:
        with measured_step(trainer_of(), device, cost, checks):
            return run()

    return phase
