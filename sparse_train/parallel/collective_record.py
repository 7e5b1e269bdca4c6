"""A record of the collectives a piece of code calls: per call, its op, the bytes of its largest
tensor and the global ranks of its group. One definition for the dry run (on fake tensors),
the planner's probes and cost model, and real runs (`CollectiveRecorder`), so that a prediction
and a measurement count the same bytes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass(frozen=True)
class CollectiveCall:
    """One collective call: what a cost model needs (the bytes of its largest tensor, the whole
    buffer of an all-gather's output or a reduce-scatter's input, and who takes part)."""

    op: str
    nbytes: int
    ranks: tuple[int, ...]
    unit: str = ""  # the model's unit calling it ("blocks.3", "mtp.0"; "" the rest), in a measured step


# functional collectives' bookkeeping: waiting for a result, wrapping one for autograd
NOT_MOVING_DATA = ("wait_tensor", "_wrap_tensor_autograd")


def is_collective(op: str) -> bool:
    """A c10d op that moves data."""
    return op.startswith(("c10d::", "_c10d_functional::")) and not any(name in op for name in NOT_MOVING_DATA)


def collective_call(op: str, args: tuple, kwargs: dict | None = None, unit: str = "") -> CollectiveCall:
    """The record of one dispatched c10d op `op` called with `args`, `kwargs`."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    tensors = [t for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, torch.Tensor)]
    nbytes = max((t.numel() * t.element_size() for t in tensors), default=0)
    flat = tree_flatten(args)[0]
    boxed = [arg for arg in flat if isinstance(arg, torch.ScriptObject)]  # c10d ops: the group, boxed
    names = [arg for arg in flat if isinstance(arg, str)]  # functional ops: its name, their last string
    group = None
    if boxed:
        group = dist.ProcessGroup.unbox(boxed[0])
    elif names and op.startswith("_c10d_functional::"):
        group = _resolve_process_group(names[-1])
    ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else ()
    return CollectiveCall(op, nbytes, ranks, unit)


class CollectiveRecorder(TorchDispatchMode):
    """Records every collective called in its scope, on real tensors (a real run's measurement).
    Every op passes through Python while it is active: for measuring, not for timing."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[CollectiveCall] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if is_collective(func.name()):
            self.calls.append(collective_call(func.name(), args, kwargs))
        return func(*args, **(kwargs or {}))

    def bytes_by_op(self) -> dict[str, int]:
        """op -> the bytes of its calls' largest tensors, summed."""
        totals: Counter[str] = Counter()
        for call in self.calls:
            totals[call.op] += call.nbytes
        return dict(totals)
