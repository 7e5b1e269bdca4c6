"""Lazy tensors and the streaming safetensors writer (sparse_train/lazy.py)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from sparse_train.lazy import Stacked, Transposed, read_safetensors_index, write_safetensors

TENSORS = {
    "w": torch.randn(6, 5),
    "half": torch.randn(7).bfloat16(),
    "ids": torch.arange(4),
    "empty": torch.zeros(0, 3),
}


def _shapes(tensors):
    return {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}


def test_the_streaming_writer_writes_what_safetensors_reads_one_tensor_at_a_time(tmp_path):
    asked: list[str] = []

    def read(name: str) -> torch.Tensor:
        asked.append(name)
        return TENSORS[name]

    write_safetensors(tmp_path / "out.safetensors", _shapes(TENSORS), read, {"format": "pt"})
    assert asked == list(TENSORS), "each tensor read once, in order, while writing"
    got = load_file(tmp_path / "out.safetensors")
    assert all(torch.equal(got[name], t) for name, t in TENSORS.items())
    # the same layout (header, alignment, data) as safetensors' own file of these tensors
    save_file(TENSORS, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "out.safetensors").stat().st_size == (tmp_path / "ref.safetensors").stat().st_size


def test_a_tensor_that_does_not_match_its_header_is_refused(tmp_path):
    with pytest.raises(ValueError, match="w: read"):
        write_safetensors(tmp_path / "bad.safetensors", _shapes(TENSORS), lambda name: torch.zeros(2))


def test_regions_of_composed_lazy_tensors_read_from_the_file(tmp_path):
    save_file({"a": torch.randn(4, 6), "b": torch.randn(4, 6)}, tmp_path / "m.safetensors")
    lazy = read_safetensors_index(tmp_path / "m.safetensors")
    whole = torch.stack([lazy["a"].full().T, lazy["b"].full().T], dim=1)  # [6, 2, 4]
    stacked = Stacked([Transposed(lazy["a"]), Transposed(lazy["b"])], dim=1)
    assert tuple(stacked.shape) == (6, 2, 4)
    assert torch.equal(stacked[1:5, 1:2, 2:], whole[1:5, 1:2, 2:])
    assert torch.equal(stacked.full(), whole)


def test_a_truncated_file_is_named_from_its_header(tmp_path):
    save_file({"a": torch.randn(100)}, tmp_path / "t.safetensors")
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:-10])
    with pytest.raises(ValueError, match="bytes, the header describes"):
        read_safetensors_index(tmp_path / "t.safetensors")
