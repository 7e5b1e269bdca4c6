"""How a training process starts, whoever starts it: the `train` command (alone, or as one of
torchrun's workers) and a Ray Train worker (launch/ray_launch.py) call `run_training`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sparse_train.config import load_config
from sparse_train.errors import UsageError

if TYPE_CHECKING:
    from sparse_train.train.summary import RunSummary


@dataclass
class TrainRequest:
    """What `sparse-train train` was asked: a recipe, overrides, where to write, where to start from."""

    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    run_dir: Path | None = None  # None: runs/CONFIG_NAME/TIMESTAMP
    resume: str | None = None  # "auto" or a checkpoint path
    init_from: str | None = None  # HF directory, upcycled model or run whose weights start the run

    def resolved_run_dir(self) -> Path:
        if self.run_dir is not None:
            return Path(self.run_dir)
        return default_run_dir(self.config)


def default_run_dir(config_path: str | None) -> Path:
    name = Path(config_path).stem if config_path else "default"
    return Path("runs") / name / time.strftime("%Y%m%d-%H%M%S")


def run_training(request: TrainRequest) -> RunSummary | None:
    """Train as requested in this process; the run's summary on the main rank, None elsewhere."""
    if request.resume == "auto" and request.run_dir is None:
        raise UsageError("sparse-train train: --resume auto needs --run-dir (the run to continue)")
    init_weights = None
    if request.init_from:
        from sparse_train.upcycle.init_from import init_from

        cfg, init_weights = init_from(Path(request.init_from), request.config, request.overrides)
    else:
        cfg = load_config(request.config, request.overrides)
    from sparse_train.train.trainer import Trainer  # torch: only once the config is known to be good

    trainer = Trainer(cfg, request.resolved_run_dir(), resume=request.resume, init_weights=init_weights)
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    return summary if trainer.is_main else None
