"""Global-batch balancing counts belong to one optimizer step: step 2's loss uses only step 2's tokens.

With `balance_scope=global_batch`, f_i is formed from the counts of the step's micro-batches so
far. Those counts must start afresh at every optimizer step. The check is observable only: a
run that trains steps 1 and 2 must report, for step 2, exactly what a run resumed from the
step-1 checkpoint reports for its first step (a fresh process, which cannot have carried any
counts over). Were step 1's counts still in the sum, the two would differ.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparse_train.train.trainer import Trainer
from tests.conftest import tiny_config

# Two optimizer steps of two micro-batches each, a checkpoint after each step.
TWO_STEPS = ("train.steps=2", "train.grad_accum=2", "checkpoint.every=1", "train.eval_every=0")
SCOPES = {
    "moe": ("router.balance_scope=global_batch",),
    "fff": ("model.ffn=fff", "fff.depth=2", "fff.leaf_width=8", "fff.balance_scope=global_batch"),
}


def _aux_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["aux_loss"] for r in records if "aux_loss" in r}


@pytest.mark.parametrize("kind", sorted(SCOPES))
def test_second_step_balancing_loss_counts_only_its_own_micro_batches(tmp_path: Path, kind: str) -> None:
    overrides = (*TWO_STEPS, *SCOPES[kind])
    straight = tmp_path / "straight"
    Trainer(tiny_config(*overrides), straight, log=lambda _: None).fit()
    resumed = tmp_path / "resumed"
    step1 = straight / "checkpoints" / "step_00000001"
    Trainer(tiny_config(*overrides), resumed, resume=str(step1), log=lambda _: None).fit()
    assert _aux_losses(resumed)[2] == _aux_losses(straight)[2]


@pytest.mark.parametrize("kind", sorted(SCOPES))
def test_global_batch_counts_do_span_the_micro_batches_of_a_step(tmp_path: Path, kind: str) -> None:
    # Without this the test above proves nothing: were the counts not summed over micro-batches
    # at all, a missing reset would not show in the loss either.
    scoped = (*TWO_STEPS, "train.steps=1", *SCOPES[kind])
    local = tuple(o.replace("global_batch", "micro_batch") for o in scoped)
    Trainer(tiny_config(*scoped), tmp_path / "global", log=lambda _: None).fit()
    Trainer(tiny_config(*local), tmp_path / "local", log=lambda _: None).fit()
    assert abs(_aux_losses(tmp_path / "global")[1] - _aux_losses(tmp_path / "local")[1]) > 1e-6
