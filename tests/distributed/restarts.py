"""Shared by the restart tests: the job they run through torchrun, and how two runs are compared."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from sparse_train.train import checkpoint as ckpt
from tests.conftest import tiny_overrides

BIN = Path(sys.executable).parent
STEPS = 8
SETS = [
    arg
    for o in tiny_overrides(f"train.steps={STEPS}", "checkpoint.every=3", "train.eval_every=0", "parallel.ep=2")
    for arg in ("--set", o)
]


def launch(
    run: Path, fail_at: str | None, max_restarts: int = 2, sets: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """The job through `sparse-train launch` (torchrun); `sets`: more `--set` overrides."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SPARSE_TRAIN_FAIL_AT", None)
    if fail_at:
        env["SPARSE_TRAIN_FAIL_AT"] = fail_at
    argv = [
        str(BIN / "sparse-train"),
        "launch",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        str(max_restarts),
        "train",
        "--run-dir",
        str(run),
        "--resume",
        "auto",
        *SETS,
        *(arg for o in sets for arg in ("--set", o)),
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def assert_same_run(run: Path, reference: Path) -> None:
    assert losses(run) == losses(reference), "every step's loss, before and after the restart"
    final = ckpt.step_dir_name(STEPS)
    got, want = ckpt.read_weights(run / "checkpoints" / final), ckpt.read_weights(reference / "checkpoints" / final)
    assert got.keys() == want.keys()
    for name, t in want.items():
        assert torch.equal(got[name], t), name


def reference_run(tmp_path_factory) -> Path:
    """The job run by torchrun without failures: what every restarted run must reproduce."""
    run = tmp_path_factory.mktemp("reference") / "run"
    done = launch(run, None, max_restarts=0)
    assert done.returncode == 0, done.stderr[-3000:]
    return run
