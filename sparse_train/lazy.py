"""Tensors read on demand, by region: a rank loading its shard of a large model reads only that
shard's bytes from a safetensors file, never the whole tensor nor the whole file.

`source[name][region]` is the one operation (`region`: a tuple of unit-step slices, one per
dim), the same on a `torch.Tensor`, so a mapping of these or of real tensors loads alike
(`sparse_train.models.init.load_parameters`). Format conversions compose without reading:
a Hugging Face expert's `[F, D]` matrix becomes a column of our stacked `[E, D, 2, F]` weight
through `Transposed` and `Stacked`, and a region of the result reads just the matching
pieces of the matching experts.
"""

from __future__ import annotations

import json
import math
import struct
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

Region = tuple[slice, ...]


class LazyTensor(ABC):
    shape: torch.Size
    dtype: torch.dtype

    @abstractmethod
    def read(self, region: Region) -> torch.Tensor:
        """The box `region` (normalised: explicit starts and stops, unit steps) as a CPU tensor."""

    def __getitem__(self, region: Region | slice) -> torch.Tensor:
        region = region if isinstance(region, tuple) else (region,)
        region = region + (slice(None),) * (len(self.shape) - len(region))
        boxes = []
        for s, n in zip(region, self.shape, strict=True):
            start, stop, step = s.indices(n)
            if step != 1:
                raise IndexError("lazy tensors read boxes: unit steps only")
            boxes.append(slice(start, max(start, stop)))
        return self.read(tuple(boxes))

    def full(self) -> torch.Tensor:
        return self[()].contiguous()

    def numel(self) -> int:
        return self.shape.numel()


class SafetensorsTensor(LazyTensor):
    """One tensor of a safetensors file; a region reads only its rows (safetensors' get_slice)."""

    def __init__(self, file: Path, name: str, shape: list[int], dtype: torch.dtype) -> None:
        self.file, self.name, self.shape, self.dtype = Path(file), name, torch.Size(shape), dtype

    def read(self, region: Region) -> torch.Tensor:
        with safe_open(str(self.file), framework="pt") as fh:
            if not region:  # a 0-d tensor
                return fh.get_tensor(self.name)
            return fh.get_slice(self.name)[region]


class Transposed(LazyTensor):
    """The transpose of a 2-D lazy tensor."""

    def __init__(self, inner: LazyTensor) -> None:
        self.inner, self.dtype = inner, inner.dtype
        self.shape = torch.Size(reversed(inner.shape))

    def read(self, region: Region) -> torch.Tensor:
        return self.inner.read((region[1], region[0])).T


class Deinterleaved(LazyTensor):
    """[..., 2F] with pairs interleaved (gpt-oss's gate/up: gate at even, up at odd columns) as
    [..., 2, F]; a region reads only the columns of its hidden units."""

    def __init__(self, inner: LazyTensor) -> None:
        self.inner, self.dtype = inner, inner.dtype
        *lead, width = inner.shape
        self.shape = torch.Size([*lead, 2, width // 2])

    def read(self, region: Region) -> torch.Tensor:
        *lead, pair, hidden = region
        columns = slice(2 * hidden.start, 2 * hidden.stop)
        pairs = self.inner.read((*lead, columns)).unflatten(-1, (-1, 2)).transpose(-1, -2)
        return pairs[..., pair, :]


class Stacked(LazyTensor):
    """torch.stack(items, dim) of same-shaped lazy tensors; a region reads only the items it covers."""

    def __init__(self, items: list[LazyTensor], dim: int) -> None:
        shapes = {tuple(t.shape) for t in items}
        if len(shapes) != 1:
            raise ValueError(f"cannot stack tensors of shapes {sorted(shapes)}")
        self.items, self.stack_dim, self.dtype = items, dim, items[0].dtype
        inner = list(items[0].shape)
        self.shape = torch.Size(inner[:dim] + [len(items)] + inner[dim:])

    def read(self, region: Region) -> torch.Tensor:
        picked, rest = region[self.stack_dim], region[: self.stack_dim] + region[self.stack_dim + 1 :]
        parts = [self.items[i].read(rest) for i in range(picked.start, picked.stop)]
        if not parts:
            return torch.empty([s.stop - s.start for s in region], dtype=self.dtype)
        return torch.stack(parts, dim=self.stack_dim)


def whole(t: LazyTensor | torch.Tensor) -> torch.Tensor:
    """A lazy tensor read whole; a tensor as it is."""
    return t.full() if isinstance(t, LazyTensor) else t


class ReadWhole(Mapping[str, torch.Tensor]):
    """A mapping of lazy or real tensors whose lookups read the tensor whole, one at a time."""

    def __init__(self, tensors: Mapping[str, LazyTensor | torch.Tensor]) -> None:
        self.tensors = tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        return whole(self.tensors[name])

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def read_all(tensors: Mapping[str, LazyTensor | torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor read whole; a tensor named twice (tied embeddings) is read once and stays one."""
    read: dict[int, torch.Tensor] = {}
    for t in tensors.values():
        if id(t) not in read:
            read[id(t)] = whole(t)
    return {name: read[id(t)] for name, t in tensors.items()}


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def write_safetensors(
    path: Path,
    shapes: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    read: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """A safetensors file of the tensors `shapes` names, each obtained from `read(name)` just
    before its bytes are written: the header is known from the shapes, so one tensor is held at
    a time, however large the file. Laid out as safetensors.torch.save_file lays it out."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, (shape, dtype) in shapes.items():
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(encoded)))
        fh.write(encoded)
        for name, (shape, dtype) in shapes.items():
            tensor = read(name)
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise ValueError(f"{name}: read {tuple(tensor.shape)} {tensor.dtype}, expected {tuple(shape)} {dtype}")
            fh.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def read_safetensors_index(file: Path) -> dict[str, SafetensorsTensor]:
    """The tensors of a safetensors file, from its header alone. Raises ValueError when the file is
    truncated or its header is not what the format says (the data is read later, by region)."""
    size = file.stat().st_size
    with file.open("rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise ValueError("shorter than a safetensors header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise ValueError(f"header of {header_len} bytes does not fit in {size} bytes")
        try:
            header = json.loads(fh.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"header is not JSON ({err})") from None
    header.pop("__metadata__", None)
    end = max((int(info["data_offsets"][1]) for info in header.values()), default=0)
    if 8 + header_len + end != size:
        raise ValueError(f"{size} bytes, the header describes {8 + header_len + end}")
    tensors = {}
    for name, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"tensor {name} has unsupported dtype {info['dtype']}")
        tensors[name] = SafetensorsTensor(file, name, info["shape"], _DTYPES[info["dtype"]])
    return tensors
