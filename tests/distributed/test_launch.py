"""End to end: torchrun and `sparse-train launch` train, checkpoint and resume across layouts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_overrides

BIN = Path(sys.executable).parent


def _sets(*extra: str) -> list[str]:
    overrides = tiny_overrides("router.balance_scope=global_batch", "train.eval_every=5", "checkpoint.every=5", *extra)
    return [arg for o in overrides for arg in ("--set", o)]


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_torchrun_and_launch_train_and_resume_in_another_layout(tmp_path):
    run = tmp_path / "run"
    # 1. plain torchrun, expert parallel over 2 processes
    first = _run(
        [
            str(BIN / "torchrun"),
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "sparse_train",
            "train",
            "--run-dir",
            str(run),
            *_sets("train.steps=10", "parallel.ep=2"),
        ]
    )
    assert first.stdout.count("trained 10 steps") == 1, "only rank 0 prints the summary"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 11)), "rank 0 alone writes metrics"
    for rank in (0, 1):
        log = (run / "logs" / f"rank{rank}.log").read_text()
        assert f"rank {rank}: dp_replicate=1 dp_shard=2 ep=2" in log
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000005", "step_00000010"]

    # 2. resume the same run with tensor parallelism instead, through `sparse-train launch`
    second = _run(
        [
            str(BIN / "sparse-train"),
            "launch",
            "--nproc-per-node",
            "2",
            "train",
            "--run-dir",
            str(run),
            "--resume",
            "auto",
            *_sets("train.steps=15", "parallel.tp=2", "parallel.dp_shard=1"),
        ]
    )
    assert "resumed from" in second.stderr and "trained 15 steps" in second.stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 16))
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0]

    # 3. and the checkpoint of the parallel run serves a single process
    evaluated = _run([str(BIN / "sparse-train"), "eval", "--checkpoint", str(run)])
    assert json.loads(evaluated.stdout)["step"] == 15
