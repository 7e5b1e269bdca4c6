"""Activation checkpointing's model side (train.recompute applies it from outside, as
train.activation_checkpointing says): chosen blocks keep only their inputs in the forward and
run again in the backward
(torch.utils.checkpoint, non-reentrant; the RNG state is restored, so a random router routes the
same tokens again). Code with side effects in a block's forward asks `recomputing()` so it runs
once per micro-batch: the aux-loss-free bias counts (models.moe) would otherwise count twice.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from torch.utils.checkpoint import checkpoint

_state = threading.local()
# called with a checkpointed forward's arguments, which the checkpoint keeps for its recomputation
# (a measuring dry run counts them: dryrun.measure)
checkpoint_input_observers: list[Any] = []


def recomputing() -> bool:
    """True while a checkpointed block runs its forward again in the backward."""
    return getattr(_state, "recomputing", False)


@contextmanager
def _marked() -> Iterator[None]:
    previous = recomputing()
    _state.recomputing = True
    try:
        yield
    finally:
        _state.recomputing = previous


def _contexts() -> tuple[Any, Any]:
    return nullcontext(), _marked()


def checkpointed(forward: Any) -> Any:
    """`forward`, recomputed in the backward instead of keeping its activations."""

    def run(*args: Any, **kwargs: Any) -> Any:
        for observe in checkpoint_input_observers:
            observe(args)
        return checkpoint(forward, *args, use_reentrant=False, context_fn=_contexts, **kwargs)

    return run
