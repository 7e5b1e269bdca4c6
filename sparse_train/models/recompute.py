"""Activation checkpointing, applied to a model from outside (train.activation_checkpointing):
chosen blocks keep only their inputs in the forward and run again in the backward
(torch.utils.checkpoint, non-reentrant; the RNG state is restored, so a random router routes the
same tokens again). Code with side effects in a block's forward asks `recomputing()` so it runs
once per micro-batch: the aux-loss-free bias counts (models.moe) would otherwise count twice.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, Literal

from torch import nn
from torch.utils.checkpoint import checkpoint

Mode = Literal["none", "all", "sparse", "dense"]
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


def checkpoint_blocks(module: nn.Module, mode: Mode) -> int:
    """Make the blocks of `module` (a model, a pipeline stage; MTP modules' blocks included) that
    `mode` names recompute their activations; how many it made so. Names and parameters are
    unchanged (the forward is replaced on the instance), so checkpoints and FSDP units are too."""
    from sparse_train.models.sparse import SparseFFN
    from sparse_train.models.transformer import Block

    if mode == "none":
        return 0
    count = 0
    for block in (m for m in module.modules() if isinstance(m, Block)):
        sparse = isinstance(block.ffn, SparseFFN)
        if mode == "all" or (mode == "sparse") == sparse:
            block.forward = _checkpointed(block.forward)  # type: ignore[method-assign]
            count += 1
    return count


def _checkpointed(forward: Any) -> Any:
    def run(*args: Any, **kwargs: Any) -> Any:
        for observe in checkpoint_input_observers:
            observe(args)
        return checkpoint(forward, *args, use_reentrant=False, context_fn=_contexts, **kwargs)

    return run
