"""Fault tolerance through torchrun: a rank killed with SIGKILL (mid-training, or in the middle of a
checkpoint save) is restarted by `sparse-train launch --max-restarts` and resumes from the
newest complete checkpoint; the run ends with exactly the model and losses of a run that was
never interrupted."""

from __future__ import annotations

import pytest

from sparse_train.train import checkpoint as ckpt
from tests.distributed.restarts import assert_same_run, launch, reference_run


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return reference_run(tmp_path_factory)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fail_at", "resumed_from"),
    [("5:1", 3), ("6:0:save", 3)],  # a kill mid-save on rank 1: the asynchronous-save test below
    ids=["rank1-after-step5", "rank0-mid-save"],
)
def test_a_killed_rank_is_restarted_and_the_run_ends_as_if_never_interrupted(
    tmp_path, uninterrupted, fail_at, resumed_from
):
    run = tmp_path / "run"
    done = launch(run, fail_at)
    _assert_restarted(run, done, uninterrupted, resumed_from)


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_killed_during_an_asynchronous_save_leaves_the_previous_checkpoint(tmp_path, uninterrupted, rank):
    """checkpoint.async_save: the kill comes from the background writer once this rank's shards
    of step 6 are on disk, while training has gone on; step 6 was never published, so the
    restarted job resumes from step 3 and ends as the synchronous, uninterrupted run did."""
    run = tmp_path / "run"
    done = launch(run, f"6:{rank}:save", sets=("checkpoint.async_save=true",))
    _assert_restarted(run, done, uninterrupted, resumed_from=3)


def _assert_restarted(run, done, uninterrupted, resumed_from: int) -> None:
    assert done.returncode == 0, done.stderr[-3000:]
    assert list(run.glob(".injected-failure-*")), "the failure was injected"
    assert f"resumed from {run / 'checkpoints' / ckpt.step_dir_name(resumed_from)}" in done.stderr
    assert_same_run(run, uninterrupted)
    assert not list((run / "checkpoints").glob(".step_*")), "the interrupted save left nothing behind"


@pytest.mark.slow
def test_without_restarts_the_failure_ends_the_job_and_keeps_the_checkpoints(tmp_path, uninterrupted):
    run = tmp_path / "run"
    done = launch(run, "5:1", max_restarts=0)
    assert done.returncode != 0
    assert [c.step for c in ckpt.list_checkpoints(run / "checkpoints")] == [3]
    again = launch(run, None, max_restarts=0)  # the user reruns the same command
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_run(run, uninterrupted)
