"""A run copied to another machine without its training data: config validation reads no files, so
`generate`, `upcycle --from RUN` and `eval` with the data pointed elsewhere work; `eval` without
data names the missing path in one line."""

from __future__ import annotations

import json
import shutil

from sparse_train.cli import main
from tests.conftest import tiny_overrides

CORPUS = "def add(a, b):\n    return a + b\n\n" * 400


def _set(*overrides: str) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def test_eval_generate_and_upcycle_a_run_whose_data_is_gone(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    run = tmp_path / "machine-a" / "run"
    overrides = tiny_overrides("model.ffn=dense", "train.steps=4", "checkpoint.every=4", f"data.path={corpus}")
    assert main(["train", "--run-dir", str(run), *_set(*overrides)]) == 0
    copy = tmp_path / "machine-b" / "run"
    shutil.copytree(run, copy)
    corpus.unlink()
    capsys.readouterr()

    assert main(["generate", "--checkpoint", str(copy), "--prompt", "def ", "--max-new-tokens", "5", "--greedy"]) == 0
    assert capsys.readouterr().out.startswith("def ")

    target = tmp_path / "machine-b" / "moe"
    argv = ["upcycle", "--from", str(copy), "--to", str(target), "--method", "copy", "--num-experts", "2"]
    assert main([*argv, "--top-k", "1"]) == 0
    assert (target / "checkpoints").is_dir()
    capsys.readouterr()

    assert main(["eval", "--checkpoint", str(copy)]) == 2  # eval does read validation data
    err = capsys.readouterr().err
    assert f"data.path: no such file or directory: {corpus}" in err and err.count("\n") == 1

    elsewhere = tmp_path / "machine-b" / "corpus.txt"
    elsewhere.write_text(CORPUS)
    assert main(["eval", "--checkpoint", str(copy), "--set", f"data.path={elsewhere}"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 4 and result["val_loss"] > 0 and str(elsewhere) in result["data"]
