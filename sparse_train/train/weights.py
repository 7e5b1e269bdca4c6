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

from torch import nn

from sparse_train.models.init import load_parameters
from sparse_train.train import sharded


class WeightSource(Protocol):
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


class CheckpointWeights:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: shape for name, (shape, _dtype) in sharded.stored_tensors(self.path).items()}

    def load_into(self, module: nn.Module, *, distributed: bool, partial: bool) -> None:
        sharded.load_model(self.path, module, distributed, partial=partial)
