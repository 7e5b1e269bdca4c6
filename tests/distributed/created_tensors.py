"""What a rank allocates while it builds: a dispatch mode recording the (local) shape of every
tensor an operation creates, and the whole shapes of the parameters a rank holds only in part.
Shared by the construction and loading tests (a whole copy of a sharded parameter is the defect)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode


def local_of(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class RecordCreated(TorchDispatchMode):
    """`shapes`: the local shape of every non-meta tensor an operation returned. Views allocate
    nothing (safetensors views its memory-mapped file, then copies a slice): not recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and not t.is_meta:
                    self.shapes.append(tuple(local_of(t).shape))
        return out


def partial_whole_shapes(module: nn.Module, larger_than: int = 0) -> set[tuple[int, ...]]:
    """Whole shapes of the parameters `module` holds in part (with more than `larger_than`
    elements); a shape that is also some parameter's local shape is left out, telling nothing."""
    params = list(module.parameters())
    local = {tuple(local_of(p).shape) for p in params}
    partial = {tuple(p.shape) for p in params if local_of(p).shape != p.shape and p.numel() > larger_than}
    return partial - local
