"""Injected failures, for testing recovery: `SPARSE_TRAIN_FAIL_AT=STEP[:RANK[:WHERE]]`.

The chosen rank (default 0) kills itself with SIGKILL — no cleanup, no flush, exactly what a
lost node or an OOM kill looks like —
    WHERE=step  after finishing step STEP (and any checkpoint at that step);
    WHERE=save  in the middle of the checkpoint at step STEP: its own shards written, the
                checkpoint not yet published (with checkpoint.async_save, from the background
                thread that publishes it, while training has gone on).
It fires once per run directory (a marker file records it), so a job restarted by torchrun's
`--max-restarts` or Ray's `max_failures` runs on past the step instead of failing again.
Unset in normal use; never set it in production.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

from sparse_train.config import ConfigError

ENV = "SPARSE_TRAIN_FAIL_AT"
WHERE = ("step", "save")


@dataclass(frozen=True)
class FailurePlan:
    step: int
    rank: int = 0
    where: str = "step"

    def marker(self, run_dir: Path) -> Path:
        return run_dir / f".injected-failure-{self.where}-step{self.step}-rank{self.rank}"


def plan_from_env(environ: dict[str, str] | None = None) -> FailurePlan | None:
    text = (environ if environ is not None else os.environ).get(ENV)
    if not text:
        return None
    parts = text.split(":")
    try:
        step, rank = int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        raise ConfigError(ENV, f"expected STEP[:RANK[:WHERE]], got {text!r}") from None
    where = parts[2] if len(parts) > 2 else "step"
    if len(parts) > 3 or where not in WHERE or step < 1 or rank < 0:
        raise ConfigError(ENV, f"expected STEP[:RANK[:{'|'.join(WHERE)}]] with STEP >= 1, got {text!r}")
    return FailurePlan(step, rank, where)


def maybe_fail(plan: FailurePlan | None, *, step: int, rank: int, where: str, run_dir: Path) -> None:
    """SIGKILL this process if the plan names this point and has not fired in `run_dir` yet."""
    if plan is None or (plan.step, plan.rank, plan.where) != (step, rank, where):
        return
    marker = plan.marker(run_dir)
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"rank {rank} killed itself at step {step} ({where})\n")
    os.kill(os.getpid(), signal.SIGKILL)


def fail_point(where: str, *, step: int, rank: int, run_dir: Path) -> None:
    """`maybe_fail` with the plan read from the environment, for code that runs inside a step
    without the trainer's plan at hand (the checkpoint writer: WHERE=save)."""
    maybe_fail(plan_from_env(), step=step, rank=rank, where=where, run_dir=run_dir)
