"""Upcycling and converting go block by block: the dense source is read one tensor at a time, each
block is converted once as it is written, and an HF output is one safetensors file per block
with an index."""

from __future__ import annotations

import json

import torch

from sparse_train.lazy import LazyTensor, SafetensorsTensor
from sparse_train.upcycle.hf import read_hf
from sparse_train.upcycle.io import load_source, write_model
from sparse_train.upcycle.methods import UpcycleSpec, upcycle


def test_an_hf_output_is_written_block_by_block_converting_each_block_once(hf_dir, tmp_path, monkeypatch):
    source = load_source(hf_dir("llama")[0])  # 2 blocks
    dense = source.weights.tensors
    assert all(isinstance(t, LazyTensor) for t in dense.values()), "the source is read by reference"

    reads: list[str] = []  # the dense tensors read, in order
    reads_before_write: list[int] = []  # how many had been read as each file was written
    original_read = SafetensorsTensor.read

    def counting_read(self, region):
        reads.append(self.name)
        return original_read(self, region)

    monkeypatch.setattr(SafetensorsTensor, "read", counting_read)
    converted: list[int] = []
    cfg, state = upcycle(
        source.cfg, dense, UpcycleSpec("copy", num_experts=4, top_k=2), progress=lambda i: converted.append(i)
    )
    assert not reads and not converted, "nothing is read or converted before the output is written"

    from safetensors.torch import save_file

    written: list[tuple[str, list[str]]] = []
    original_save = save_file

    def recording_save(tensors, filename, metadata=None):
        written.append((filename.rsplit("/", 1)[-1], sorted(tensors)))
        reads_before_write.append(len(reads))
        return original_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr("sparse_train.upcycle.hf.save_file", recording_save)
    write_model(tmp_path / "moe", cfg, state, "hf", overwrite=False)
    assert converted == [0, 1], "each block converted once, in order"
    assert [name for name, _ in written] == [f"model-0000{n}-of-00003.safetensors" for n in (1, 2, 3)]
    assert all(t.startswith("model.layers.0.") for t in written[0][1])
    assert all(t.startswith("model.layers.1.") for t in written[1][1])
    # the first file is written having read only block 0's dense tensors
    assert all(name.startswith("model.layers.0.") for name in reads[: reads_before_write[0]])
    index = json.loads((tmp_path / "moe" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(read_hf(tmp_path / "moe").tensors)


def test_blocks_convert_to_the_same_tensors_in_any_order(hf_dir):
    source = load_source(hf_dir("llama")[0])
    spec = UpcycleSpec("split", num_experts=4, top_k=2, partition="random")
    _, in_order = upcycle(source.cfg, source.weights.tensors, spec)
    first = {k: in_order[k] for k in in_order}
    _, reversed_order = upcycle(source.cfg, source.weights.tensors, spec)
    for name in reversed(list(reversed_order)):
        assert torch.equal(reversed_order[name], first[name]), name
    # a different seed draws a different partition
    _, other = upcycle(source.cfg, source.weights.tensors, UpcycleSpec("split", 4, 2, partition="random", seed=1))
    assert not torch.equal(other["blocks.0.ffn.experts.w_down"], first["blocks.0.ffn.experts.w_down"])
    converted: list[int] = []
    _, fresh = upcycle(source.cfg, source.weights.tensors, spec, progress=converted.append)
    assert "blocks.0.ffn.router.weight" in fresh and "blocks.0.ffn.w_gate.weight" not in fresh
    assert not converted, "asking what the model holds converts nothing"
