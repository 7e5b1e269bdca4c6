"""Metrics sinks: RUN_DIR/metrics.jsonl (one JSON object per record) and TensorBoard (RUN_DIR/tb)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from sparse_train import atomic
from sparse_train.models.sparse import LOAD_NAMES

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every record of a run's metrics.jsonl. A line that does not parse is left out: the run may
    be writing it right now (the Ray driver follows a live run)."""
    records = []
    for line in (Path(run_dir) / METRICS_FILE).read_text(errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; null marks a non-finite value
    return value


class MetricsLogger:
    """Writes metrics; with `enabled=False` (ranks other than the main one) it writes nothing."""

    def __init__(
        self, run_dir: Path, *, tensorboard: bool, plots_enabled: bool, resume_step: int | None, enabled: bool = True
    ) -> None:
        self.enabled = enabled
        self.run_dir = run_dir
        self.jsonl_path = run_dir / METRICS_FILE
        self.tb_dir = run_dir / "tb"
        self.plots_dir = run_dir / "plots"
        self.plots_enabled = plots_enabled and enabled
        self._tb = None
        if not enabled:
            return
        if resume_step is not None:
            self._truncate_after(resume_step)
        elif self.jsonl_path.exists():
            self.jsonl_path.unlink()
        self._jsonl = self.jsonl_path.open("a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a crashed run wrote after the checkpoint we resume from
            self._tb = SummaryWriter(str(self.tb_dir), purge_step=None if resume_step is None else resume_step + 1)
        if plots_enabled:
            self.plots_dir.mkdir(parents=True, exist_ok=True)

    def _truncate_after(self, step: int) -> None:
        """Keep only records up to `step`: later ones came from a run that did not reach a checkpoint."""
        if not self.jsonl_path.exists():
            return
        kept = [line for line in self.jsonl_path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        atomic.write_text(self.jsonl_path, "".join(line + "\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (_finite_or_none(v) if not isinstance(v, list) else v) for k, v in record.items()}
        self._jsonl.write(json.dumps(clean) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)

    def log_load(self, step: int, load_LE: np.ndarray, layer_names: list[str], kind: str = "moe") -> None:
        """The load heatmap (experts or leaves per sparse layer) to TensorBoard and plots/; for FFF
        also one TensorBoard histogram per layer whose buckets are the leaves."""
        if self._tb is None and not self.plots_enabled:
            return
        from sparse_train.train import plots  # matplotlib: half a second of every process's start

        what = "leaf" if kind == "fff" else "expert"
        tag = f"{kind}/{LOAD_NAMES[kind]}"
        fig = plots.load_heatmap(load_LE, layer_names, step, what)
        if self._tb is not None:
            self._tb.add_figure(tag, fig, step, close=False)
            if kind == "fff":
                for name, load in zip(layer_names, load_LE, strict=True):
                    self._add_leaf_histogram(f"{kind}/{name}/{LOAD_NAMES[kind]}", load, step)
        if self.plots_enabled:
            plots.save(fig, str(self.plots_dir / f"{LOAD_NAMES[kind]}.png"))
        else:
            plots.plt.close(fig)

    def _add_leaf_histogram(self, tag: str, load: np.ndarray, step: int) -> None:
        leaves = np.arange(load.size, dtype=np.float64)
        self._tb.add_histogram_raw(
            tag,
            min=0.0,
            max=float(load.size - 1),
            num=float(load.sum()),
            sum=float((leaves * load).sum()),
            sum_squares=float((leaves**2 * load).sum()),
            bucket_limits=(leaves + 0.5).tolist(),
            bucket_counts=load.astype(np.float64).tolist(),
            global_step=step,
        )

    def records(self) -> list[dict[str, Any]]:
        if not self.enabled:
            return []
        self._jsonl.flush()
        return [json.loads(line) for line in self.jsonl_path.read_text().splitlines() if line]

    def close(self) -> None:
        if not self.enabled:
            return
        if self.plots_enabled:
            from sparse_train.train import plots

            plots.save(plots.loss_curve(self.records()), str(self.plots_dir / "loss.png"))
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
