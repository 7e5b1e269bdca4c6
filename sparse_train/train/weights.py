"""Where a fresh run's starting weights come from (`train --init-from`), read by slice.

A source names its tensors' whole shapes (checked against the model before anything is read)
and loads itself into a model that is already split and sharded: every rank reads only its
own parts, so starting a model too large for one process from a checkpoint never holds it
whole anywhere.

    TensorWeights      a mapping of whole or lazily read tensors (HF safetensors by region)
    CheckpointWeights  a sparse_train checkpoint: DCP reads each rank's shards from whichever
                       pieces were written, whatever layout wrote them
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from sparse_train.lazy import LazyTensor, Region
from sparse_train.models.init import load_parameters
from sparse_train.train import sharded


class WeightSource(Protocol):
    @property
    def tensors(self) -> Mapping[str, Any]:
        """Every tensor by name: whole tensors or lazily read ones (sparse_train.lazy)."""
        ...

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's whole shape, by the model's names."""
        ...

    def load_into(self, module: nn.Module, *, distributed: bool, partial: bool) -> None:
        """Fill the parameters `module` holds (a whole model, a stage, or shards; collective when
        distributed); `partial`: the module is one pipeline stage of the model."""
        ...


class TensorWeights:
    def __init__(self, tensors: Mapping[str, Any]) -> None:
        self.tensors = tensors  # name -> torch.Tensor or sparse_train.lazy.LazyTensor

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(t.shape) for name, t in self.tensors.items()}

    def load_into(self, module: nn.Module, *, distributed: bool, partial: bool) -> None:
        load_parameters(module, self.tensors)


class CheckpointTensor(LazyTensor):
    """One tensor of a sparse_train checkpoint, read (whole: DCP reads stored pieces whole) when asked."""

    def __init__(self, path: Path, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.path, self.name, self.shape, self.dtype = path, name, torch.Size(shape), dtype

    def read(self, region: Region) -> torch.Tensor:
        return sharded.read_tensor(self.path, self.name)[region]


class CheckpointWeights:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @property
    def tensors(self) -> dict[str, CheckpointTensor]:
        """Every tensor by reference, read one at a time (conversions that go block by block)."""
        stored = sharded.stored_tensors(self.path)
        return {name: CheckpointTensor(self.path, name, shape, dtype) for name, (shape, dtype) in stored.items()}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: shape for name, (shape, _dtype) in sharded.stored_tensors(self.path).items()}

    def load_into(self, module: nn.Module, *, distributed: bool, partial: bool) -> None:
        sharded.load_model(self.path, module, distributed, partial=partial)
