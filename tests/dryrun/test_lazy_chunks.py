"""LazyChunks is FSDP's _chunk_with_empty, chunk by chunk (sizes, values, the padding empties)."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.fsdp._fully_shard._fsdp_common import _chunk_with_empty

from sparse_train.dryrun.lazy_chunks import LazyChunks


@pytest.mark.parametrize(("rows", "chunks"), [(8, 4), (10, 4), (3, 8), (1, 5), (0, 3), (7, 7), (129, 64)])
def test_lazy_chunks_equal_fsdp_chunks(rows: int, chunks: int) -> None:
    tensor = torch.arange(rows * 3, dtype=torch.float32).reshape(rows, 3)
    eager, lazy = _chunk_with_empty(tensor, chunks, dim=0), LazyChunks(tensor, chunks, 0)
    assert len(lazy) == len(eager) == chunks
    for index in [*range(chunks), -1]:
        assert lazy[index].shape == eager[index].shape, index
        assert torch.equal(lazy[index], eager[index]), index
    with pytest.raises(IndexError):
        lazy[chunks]
