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


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _first_record(run_dir):
    return next(r for r in _records(run_dir) if "lm_loss" in r)


def test_upcycled_copy_starts_where_the_dense_model_is(byte_vocab_llama, tmp_path):
    run_settings = [o for o in tiny_overrides("train.steps=2") if not o.startswith(("model.", "moe.", "router."))]
    sets = [arg for o in run_settings for arg in ("--set", o)]
    assert (
        main(
            [
                "upcycle",
                "--from",
                str(byte_vocab_llama),
                "--to",
                str(tmp_path / "moe"),
                "--method",
                "copy",
                "--num-experts",
                "4",
                "--top-k",
                "2",
            ]
        )
        == 0
    )
    assert main(["train", "--init-from", str(byte_vocab_llama), "--run-dir", str(tmp_path / "dense-run"), *sets]) == 0
    assert main(["train", "--init-from", str(tmp_path / "moe"), "--run-dir", str(tmp_path / "moe-run"), *sets]) == 0
    dense, moe = _first_record(tmp_path / "dense-run"), _first_record(tmp_path / "moe-run")
    assert moe["lm_loss"] == pytest.approx(dense["lm_loss"], rel=1e-5)  # the same function at step 0
    dense_start, moe_start = _records(tmp_path / "dense-run")[0], _records(tmp_path / "moe-run")[0]
    assert dense_start["step"] == moe_start["step"] == 0  # a run from given weights evaluates them first
    assert moe_start["val_loss"] == pytest.approx(dense_start["val_loss"], rel=1e-5)
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


@pytest.mark.slow  # `make test` stays under 4 minutes
def test_a_checkpoints_own_tokenizer_reads_the_training_data(hf_dir, tmp_path):
    from sparse_train.data.tokenizer import HFTokenizer
    from tests.upcycle.conftest import save_tiny_tokenizer

    path, _ = hf_dir("llama")  # vocabulary of 64: byte tokens would not fit, the BPE's do
    save_tiny_tokenizer(path)
    run_settings = [o for o in tiny_overrides("train.steps=2") if not o.startswith(("model.", "moe.", "router."))]
    sets = [arg for o in run_settings for arg in ("--set", o)]
    assert main(["train", "--init-from", str(path), "--run-dir", str(tmp_path / "run"), *sets]) == 0
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "tokenizer: hf" in saved and f"tokenizer_path: {path.resolve()}" in saved
    tokenizer = HFTokenizer(path)
    assert tokenizer.decode(tokenizer.encode("return a + b")) == "return a + b"


def test_tokenizer_config_errors_name_the_field(tmp_path):
    from sparse_train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="tokenizer_path.*needs the directory"):
        load_config(None, ["data.tokenizer=hf"])
    cfg = load_config(None, ["data.tokenizer=hf", f"data.tokenizer_path={tmp_path / 'none'}"])  # no file I/O here
    with pytest.raises(ConfigError, match="data.tokenizer_path: no such directory"):
        from sparse_train.data.tokenizer import build_tokenizer

        build_tokenizer(cfg.data)  # where the directory is read
    with pytest.raises(ConfigError, match="cannot load a tokenizer"):
        from sparse_train.data.tokenizer import HFTokenizer

        HFTokenizer(tmp_path)
