"""`train --init-from`: a run starts from an HF or upcycled model's weights."""

from __future__ import annotations

import json

import pytest

from sparse_train.cli import main
from tests.conftest import tiny_overrides
from tests.upcycle.conftest import COMMON, transformers


@pytest.fixture
def byte_vocab_llama(tmp_path):
    """A tiny HF Llama whose vocabulary fits the byte tokenizer (258 ids)."""
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**COMMON, "vocab_size": 258}))
    model.save_pretrained(tmp_path / "dense")
    return tmp_path / "dense"


def _first_record(run_dir):
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])


def test_upcycled_copy_starts_where_the_dense_model_is(byte_vocab_llama, tmp_path):
    run_settings = [o for o in tiny_overrides("train.steps=2") if not o.startswith(("model.", "moe.", "router."))]
    sets = [arg for o in run_settings for arg in ("--set", o)]
    assert main(["upcycle", "--from", str(byte_vocab_llama), "--to", str(tmp_path / "moe"), "--method", "copy",
                 "--num-experts", "4", "--top-k", "2"]) == 0  # fmt: skip
    assert main(["train", "--init-from", str(byte_vocab_llama), "--run-dir", str(tmp_path / "dense-run"), *sets]) == 0
    assert main(["train", "--init-from", str(tmp_path / "moe"), "--run-dir", str(tmp_path / "moe-run"), *sets]) == 0
    dense, moe = _first_record(tmp_path / "dense-run"), _first_record(tmp_path / "moe-run")
    assert moe["lm_loss"] == pytest.approx(dense["lm_loss"], rel=1e-5)  # the same function at step 0
    assert "moe/block0/expert_load" in moe and "moe/block0/expert_load" not in dense
    saved = (tmp_path / "moe-run" / "config.yaml").read_text()
    assert "num_experts: 4" in saved and "d_model: 32" in saved  # model sections from the source


def test_init_from_errors_are_one_line(byte_vocab_llama, tmp_path, capsys):
    capsys.readouterr()
    assert main(["train", "--init-from", str(tmp_path / "missing"), "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "no such directory" in err and err.count("\n") == 1
    # --set still wins over the source, and weights that no longer fit are named
    argv = ["train", "--init-from", str(byte_vocab_llama), "--run-dir", str(tmp_path / "r"), "--set", "model.n_heads=2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--init-from: blocks.0.attn.wk.weight has shape" in err and err.count("\n") == 1
