"""train.activation_checkpointing: which blocks recompute their activations (models.recompute)."""

from __future__ import annotations

from typing import Literal

from torch import nn

from sparse_train.models.recompute import checkpointed
from sparse_train.models.sparse import SparseFFN
from sparse_train.models.transformer import Block

Mode = Literal["none", "all", "sparse", "dense"]


def checkpoint_blocks(module: nn.Module, mode: Mode) -> int:
    """Make the blocks of `module` (a model, a pipeline stage; MTP modules' blocks included) that
    `mode` names recompute their activations; how many it made so. Names and parameters are
    unchanged (the forward is replaced on the instance), so checkpoints and FSDP units are too."""
    if mode == "none":
        return 0
    count = 0
    for block in (m for m in module.modules() if isinstance(m, Block)):
        sparse = isinstance(block.ffn, SparseFFN)
        if mode == "all" or (mode == "sparse") == sparse:
            block.forward = checkpointed(block.forward)  # type: ignore[method-assign]
            count += 1
    return count
