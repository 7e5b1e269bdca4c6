"""`train --init-from` into a sharded layout reads each rank's parts: an HF Mixtral directory
(safetensors read by region: no rank creates a whole tensor of a parameter it holds in part)
and a sparse_train checkpoint (DCP) start an ep=2 run with exactly the source's weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sparse_train.launch.local import run_ranks
from sparse_train.lazy import Stacked, read_all
from sparse_train.upcycle.hf import native_config, read_hf, to_native
from tests.distributed.test_layouts import _data
from tests.upcycle.conftest import COMMON, transformers

RUN = ["train.batch_size=4", "train.steps=1", "data.seq_len=32", "checkpoint.every=0", "checkpoint.save_final=false"]


@pytest.fixture
def mixtral_dir(tmp_path) -> Path:
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        **{**COMMON, "vocab_size": 258, "intermediate_size": 64}, num_local_experts=4, num_experts_per_tok=2
    )
    transformers.MixtralForCausalLM(config).save_pretrained(tmp_path / "mixtral")
    return tmp_path / "mixtral"


def _start(source: str, overrides: list[str], run_dir: str, data) -> dict:
    """The run's starting weights (gathered whole) and the whole shapes of its partly held
    parameters that any operation created while the trainer was built."""
    from sparse_train.train.trainer import Trainer
    from sparse_train.upcycle.init_from import init_from
    from tests.distributed.created_tensors import RecordCreated, partial_whole_shapes

    cfg, weights = init_from(Path(source), None, overrides)
    with RecordCreated() as record:
        trainer = Trainer(cfg, Path(run_dir), init_weights=weights, data=data, log=lambda msg: None)
    try:
        partial = partial_whole_shapes(trainer.model)
        whole_copies = set(record.shapes) & partial
        return {"weights": trainer.engine.full_state_dict(), "partial": partial, "whole_copies": whole_copies}
    finally:
        trainer.close()


def test_an_hf_source_loads_into_expert_shards_by_slice(mixtral_dir, tmp_path):
    hf = read_hf(mixtral_dir)
    want_hf = read_all(to_native(hf, native_config(hf)))
    overrides = [*RUN, "parallel.ep=2"]
    ranks = run_ranks(_start, 2, str(mixtral_dir), overrides, str(tmp_path / "from-hf"), _data())
    for rank, got in enumerate(ranks):
        assert got["partial"], f"rank {rank} should hold the experts in part"
        assert not got["whole_copies"], f"rank {rank} created whole tensors {got['whole_copies']}"
    assert sorted(ranks[0]["weights"]) == sorted(want_hf)
    assert all(torch.equal(ranks[0]["weights"][k], want_hf[k]) for k in want_hf), "weights differ from the HF source"


@pytest.mark.slow
def test_a_native_run_loads_into_expert_shards_through_dcp(mixtral_dir, tmp_path):
    """The same weights as a native model (a run directory), then into ep=2 through DCP. DCP
    reads a stored piece whole and keeps the rank's part: from a checkpoint one process wrote
    that is one whole tensor at a time (its shards plus one tensor, the issue's bound)."""
    from sparse_train.cli import main
    from sparse_train.train import checkpoint as ckpt

    argv = ["convert", "--from", str(mixtral_dir), "--to", str(tmp_path / "native"), "--format", "native"]
    assert main(argv) == 0
    want = ckpt.read_weights(ckpt.resolve_checkpoint_path(tmp_path / "native", warn=lambda m: None))
    overrides = [*RUN, "parallel.ep=2"]
    ranks = run_ranks(_start, 2, str(tmp_path / "native"), overrides, str(tmp_path / "from-native"), _data())
    assert sorted(ranks[0]["weights"]) == sorted(want)
    assert all(torch.equal(ranks[0]["weights"][k], want[k]) for k in want), "weights differ from the run's"


def test_a_region_of_stacked_experts_reads_only_the_experts_and_slices_it_covers(mixtral_dir, monkeypatch):
    from sparse_train import lazy

    hf = read_hf(mixtral_dir)
    w_gate_up = to_native(hf, native_config(hf))["blocks.0.ffn.experts.w_gate_up"]  # [E=4, D=32, 2, F=64]
    assert isinstance(w_gate_up, Stacked) and tuple(w_gate_up.shape) == (4, 32, 2, 64)
    whole = w_gate_up.full()
    reads: list[tuple[str, tuple[slice, ...]]] = []
    original = lazy.SafetensorsTensor.read

    def counting(self, region):
        reads.append((self.name, region))
        return original(self, region)

    monkeypatch.setattr(lazy.SafetensorsTensor, "read", counting)
    part = w_gate_up[2:4, :, :, 32:64]  # what rank 1 of ep=2 x tp=2 holds
    assert torch.equal(part, whole[2:4, :, :, 32:64])
    assert sorted({name.split(".experts.")[1] for name, _ in reads}) == [
        "2.w1.weight",
        "2.w3.weight",
        "3.w1.weight",
        "3.w3.weight",
    ]
    assert all(region == (slice(32, 64), slice(0, 32)) for _, region in reads), "rows F/2.. of each [F, D] matrix"
