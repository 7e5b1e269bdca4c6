"""Fault tolerance through torchrun: a rank killed with SIGKILL (mid-training, or in the middle of a
checkpoint save) is restarted by `sparse-train launch --max-restarts` and resumes from the
newest complete checkpoint; the run ends with exactly the model and losses of a run that was
never interrupted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparse_train.train import checkpoint as ckpt
from tests.conftest import tiny_overrides

BIN = Path(sys.executable).parent
STEPS = 8
SETS = [arg for o in tiny_overrides(f"train.steps={STEPS}", "checkpoint.every=3", "train.eval_every=0",
                                    "parallel.ep=2") for arg in ("--set", o)]  # fmt: skip


def _launch(run: Path, fail_at: str | None, max_restarts: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SPARSE_TRAIN_FAIL_AT", None)
    if fail_at:
        env["SPARSE_TRAIN_FAIL_AT"] = fail_at
    argv = [str(BIN / "sparse-train"), "launch", "--nproc-per-node", "2", "--max-restarts", str(max_restarts),
            "train", "--run-dir", str(run), "--resume", "auto", *SETS]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("reference") / "run"
    done = _launch(run, None, max_restarts=0)
    assert done.returncode == 0, done.stderr[-3000:]
    return run


def _assert_same_run(run: Path, reference: Path) -> None:
    assert _losses(run) == _losses(reference), "every step's loss, before and after the restart"
    final = ckpt.step_dir_name(STEPS)
    got, want = ckpt.read_weights(run / "checkpoints" / final), ckpt.read_weights(reference / "checkpoints" / final)
    assert got.keys() == want.keys()
    for name, t in want.items():
        assert torch.equal(got[name], t), name


@pytest.mark.slow
@pytest.mark.parametrize(("fail_at", "resumed_from"), [("5:1", 3), ("6:0:save", 3), ("6:1:save", 3)],
                         ids=["rank1-after-step5", "rank0-mid-save", "rank1-mid-save"])  # fmt: skip
def test_a_killed_rank_is_restarted_and_the_run_ends_as_if_never_interrupted(
    tmp_path, uninterrupted, fail_at, resumed_from
):
    run = tmp_path / "run"
    done = _launch(run, fail_at)
    assert done.returncode == 0, done.stderr[-3000:]
    assert list(run.glob(".injected-failure-*")), "the failure was injected"
    assert f"resumed from {run / 'checkpoints' / ckpt.step_dir_name(resumed_from)}" in done.stderr
    _assert_same_run(run, uninterrupted)
    assert not list((run / "checkpoints").glob(".step_*")), "the interrupted save left nothing behind"


@pytest.mark.slow
def test_without_restarts_the_failure_ends_the_job_and_keeps_the_checkpoints(tmp_path, uninterrupted):
    run = tmp_path / "run"
    done = _launch(run, "5:1", max_restarts=0)
    assert done.returncode != 0
    assert [c.step for c in ckpt.list_checkpoints(run / "checkpoints")] == [3]
    again = _launch(run, None, max_restarts=0)  # the user reruns the same command
    assert again.returncode == 0, again.stderr[-3000:]
    _assert_same_run(run, uninterrupted)
