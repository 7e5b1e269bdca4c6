"""What one training step costs a rank, measured on the fake tensors of a dry run: the peak
device memory by kind (torch's MemTracker: parameters, gradients, optimizer state, activations,
temporaries, buffers) and the FLOPs of its operators (FlopCounterMode). The real trainer runs;
nothing is allocated and no kernel runs, so a rank of a 1,000-GPU layout measures in seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StepCost:
    peak_bytes: dict[str, int] = field(default_factory=dict)  # kind -> bytes at the device's peak
    flops: int = 0

    @property
    def peak_total(self) -> int:
        return self.peak_bytes.get("Total", 0)


@contextmanager
def measured_step(trainer: Any, device: str, cost: StepCost) -> Iterator[None]:
    """Track `trainer`'s model and optimizer while the block runs; fill `cost` when it ends."""
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.utils.flop_counter import FlopCounterMode

    tracker = MemTracker()
    tracker.track_external(trainer.model, trainer.optimizer)
    flops = FlopCounterMode(display=False)
    with tracker, flops:
        yield
    for dev, snapshot in tracker.get_tracker_snapshot("peak").items():
        if str(dev).startswith(device):
            cost.peak_bytes = {str(getattr(kind, "value", kind)): int(v) for kind, v in snapshot.items()}
    cost.flops = int(flops.get_total_flops())


def measuring(run: Callable[[], Any], trainer_of: Callable[[], Any], device: str, cost: StepCost) -> Callable[[], Any]:
    """`run` (a dry-run phase) measured into `cost`."""

    def phase() -> Any:
        with measured_step(trainer_of(), device, cost):
            return run()

    return phase
