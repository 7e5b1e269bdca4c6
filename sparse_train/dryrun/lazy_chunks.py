"""FSDP's sharding at a large world without building every rank's shard.

`fully_shard` splits each parameter into one chunk per rank of its shard group
(`_chunk_with_empty`: `torch.chunk`, padded with empty tensors) and keeps only its own and the
first (the padded size). On fake tensors under the dry run's dispatch modes each chunk is a
Python-dispatched view: at 2,048 ranks that is most of a dry run's time (26 of 43 s for a
two-block DeepSeek-V3). `LazyChunks` is the same sequence with each chunk made when indexed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch


class LazyChunks(Sequence):
    """torch.chunk(tensor, num_chunks, dim) padded to num_chunks with empty tensors, by index."""

    def __init__(self, tensor: torch.Tensor, num_chunks: int, dim: int) -> None:
        self.tensor, self.num_chunks, self.dim = tensor, num_chunks, dim
        size = tensor.size(dim)
        self.chunk_size = -(-size // num_chunks) if size else 0  # torch.chunk: ceil(size / chunks)

    def __len__(self) -> int:
        return self.num_chunks

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.num_chunks))]
        if index < 0:
            index += self.num_chunks
        if not 0 <= index < self.num_chunks:
            raise IndexError(index)
        size = self.tensor.size(self.dim)
        start = index * self.chunk_size
        if size == 0:  # torch.chunk of an empty dimension: num_chunks empty views
            return self.tensor.narrow(self.dim, 0, 0)
        if start >= size:  # past torch.chunk's last chunk: _chunk_with_empty's 1-d padding
            return self.tensor.new_empty(0)
        return self.tensor.narrow(self.dim, start, min(self.chunk_size, size - start))


@contextlib.contextmanager
def patched() -> Iterator[None]:
    from unittest import mock

    from torch.distributed.fsdp._fully_shard import _fsdp_param

    with mock.patch.object(_fsdp_param, "_chunk_with_empty", LazyChunks):
        yield
