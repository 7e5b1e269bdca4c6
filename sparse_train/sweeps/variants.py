"""`sparse-train sweep table`: a sweep of named variants (the `variant` axis, e.g. one router
each) as one row per variant, with the mean and spread over its seeds of what each trial's
metrics.jsonl recorded.

Per trial (DIR/trials/<id>/run/metrics.jsonl):
- validation loss, overall and per source (`val_loss`, `val_loss/<source>`): the last evaluation;
- specialisation (`moe/<layer>/specialisation`): the last evaluation, mean over MoE layers;
- load max/mean, dropped fraction, experts per token (`moe/<layer>/load_imbalance`,
  `dropped_fraction`, `experts_per_token`): the mean over MoE layers of each, averaged over the
  last `FINAL_WINDOW` logged training steps;
- tokens/s: the median over the logged training steps (the first includes start-up).
A metric a trial did not record (a dense model has no expert load) is left out of its variant's
statistics; a variant none of whose trials recorded it shows nothing.
"""

from __future__ import annotations

import csv
import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparse_train.sweeps.runner import FINAL_WINDOW, RESULTS
from sparse_train.sweeps.spec import SweepError

LAYER_STEP_METRICS = {
    "load_max_mean": "load_imbalance",
    "dropped": "dropped_fraction",
    "experts_per_token": "experts_per_token",
}
COLUMNS = ("val_loss", "load_max_mean", "dropped", "experts_per_token", "specialisation", "tokens_per_s")
TITLES = {
    "val_loss": "val loss",
    "load_max_mean": "load max/mean",
    "dropped": "dropped",
    "experts_per_token": "experts/token",
    "specialisation": "specialisation",
    "tokens_per_s": "tokens/s",
}


@dataclass
class TrialMetrics:
    """One finished trial's summary numbers (None: not recorded)."""

    variant: str
    seed: int
    metrics: dict[str, float | None]


@dataclass
class Stat:
    values: list[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        """Sample standard deviation over seeds (0 with one seed)."""
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "mean": self.mean,
            "std": self.std,
            "min": min(self.values),
            "max": max(self.values),
            "n": len(self.values),
            "values": self.values,
        }


@dataclass
class VariantRow:
    variant: str
    seeds: list[int]
    stats: dict[str, Stat] = field(default_factory=dict)


def variant_name(values: dict[str, Any]) -> str:
    """A trial's variant: the `variant` axis's name, else its other axis values joined."""
    variant = values.get("variant")
    if isinstance(variant, dict) and "name" in variant:
        return str(variant["name"])
    parts = [
        f"{k}={json.dumps(v, sort_keys=True) if isinstance(v, dict) else v}" for k, v in values.items() if v is not None
    ]
    return ", ".join(parts) or "all"


def _layer_mean(record: dict[str, Any], name: str) -> float | None:
    pattern = re.compile(rf"^moe/[^/]+/{re.escape(name)}$")
    values = [float(v) for k, v in record.items() if pattern.match(k) and isinstance(v, (int, float))]
    return statistics.fmean(values) if values else None


def _window_mean(records: list[dict[str, Any]], name: str) -> float | None:
    values = [v for v in (_layer_mean(r, name) for r in records[-FINAL_WINDOW:]) if v is not None]
    return statistics.fmean(values) if values else None


def trial_metrics(metrics_path: Path) -> dict[str, float | None]:
    """The summary numbers of one run's metrics.jsonl (see the module docstring)."""
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    steps = [r for r in records if "lm_loss" in r]
    evals = [r for r in records if "val_loss" in r]
    last_eval = evals[-1] if evals else {}
    out: dict[str, float | None] = {"val_loss": last_eval.get("val_loss")}
    out.update({k: float(v) for k, v in last_eval.items() if k.startswith("val_loss/")})
    out["specialisation"] = _layer_mean(last_eval, "specialisation")
    for key, name in LAYER_STEP_METRICS.items():
        out[key] = _window_mean(steps, name)
    speeds = [float(r["tokens_per_s"]) for r in steps if "tokens_per_s" in r]
    out["tokens_per_s"] = statistics.median(speeds) if speeds else None
    return out


def read_trials(directory: Path) -> list[TrialMetrics]:
    """Every finished trial of a sweep directory, in the spec's order; one-line errors for a bad directory."""
    directory = Path(directory)
    records = _in_sweep_order(directory, sorted((directory / "trials").glob("*/trial.json")))
    if not directory.is_dir() or not records:
        raise SweepError(
            f"{directory} is not a sweep directory (no trials/*/trial.json): run `sparse-train sweep run` first"
        )
    trials = []
    for path in records:
        try:
            rec = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise SweepError(f"{path} is not valid JSON") from None
        metrics_path = path.parent / "run" / "metrics.jsonl"
        if rec.get("status") != "done" or not metrics_path.is_file():
            continue
        trials.append(
            TrialMetrics(variant_name(rec.get("values") or {}), int(rec.get("seed", 0)), trial_metrics(metrics_path))
        )
    if not trials:
        raise SweepError(f"{directory}: no finished trial yet ({len(records)} recorded, none done)")
    return trials


def _in_sweep_order(directory: Path, records: list[Path]) -> list[Path]:
    """The trials results.csv lists (the spec's current points), in its order; without a
    results.csv, every trial directory."""
    results = directory / RESULTS
    if not results.is_file():
        return records
    with results.open() as fh:
        order = {row["trial_id"]: i for i, row in enumerate(csv.DictReader(fh))}
    return sorted((p for p in records if p.parent.name in order), key=lambda p: order[p.parent.name])


def summarise(trials: list[TrialMetrics]) -> list[VariantRow]:
    """One row per variant (in first-seen order) with each metric's statistics over its seeds."""
    rows: dict[str, VariantRow] = {}
    for t in trials:
        row = rows.setdefault(t.variant, VariantRow(t.variant, []))
        row.seeds.append(t.seed)
        for key, value in t.metrics.items():
            if value is not None:
                row.stats.setdefault(key, Stat([])).values.append(float(value))
    return list(rows.values())


def sources(rows: list[VariantRow]) -> list[str]:
    """The validation sources any variant recorded, in first-seen order."""
    seen: dict[str, None] = {}
    for row in rows:
        for key in row.stats:
            if key.startswith("val_loss/"):
                seen.setdefault(key.removeprefix("val_loss/"), None)
    return list(seen)


def _cell(stat: Stat | None, key: str) -> str:
    if stat is None:
        return ""
    digits = 0 if key == "tokens_per_s" else 2 if key == "load_max_mean" else 3 if key == "experts_per_token" else 4
    return f"{stat.mean:.{digits}f} ± {stat.std:.{digits}f}"


def format_table(rows: list[VariantRow]) -> str:
    """A Markdown table: per variant and metric, mean ± sample std over the seeds."""
    keys = ["val_loss", *(f"val_loss/{s}" for s in sources(rows)), *COLUMNS[1:]]
    titles = [TITLES.get(k, k.replace("val_loss/", "val ")) for k in keys]
    lines = ["| variant | seeds | " + " | ".join(titles) + " |", "| --- | --- |" + " ---: |" * len(keys)]
    for row in rows:
        cells = [_cell(row.stats.get(k), k) for k in keys]
        lines.append(f"| {row.variant} | {len(row.seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_json(rows: list[VariantRow]) -> list[dict[str, Any]]:
    return [{"variant": r.variant, "seeds": r.seeds, **{k: s.as_dict() for k, s in r.stats.items()}} for r in rows]


def compare(rows: list[VariantRow], first: str, second: str) -> list[dict[str, Any]]:
    """Per metric both variants recorded: their means and stds, second - first (of the means and
    per seed, pairing equal seeds: same data order and initialisation), and the difference of
    the means over the larger of the two stds."""
    by_name = {r.variant: r for r in rows}
    for name in (first, second):
        if name not in by_name:
            raise SweepError(f"no variant {name!r} in the sweep; it has: {', '.join(by_name)}")
    a, b = by_name[first], by_name[second]
    out = []
    for key in [k for k in a.stats if k in b.stats]:
        sa, sb = a.stats[key], b.stats[key]
        seeds_a = dict(zip(a.seeds, sa.values, strict=False)) if len(sa.values) == len(a.seeds) else {}
        seeds_b = dict(zip(b.seeds, sb.values, strict=False)) if len(sb.values) == len(b.seeds) else {}
        paired = [seeds_b[s] - seeds_a[s] for s in seeds_a if s in seeds_b]
        spread = max(sa.std, sb.std)
        diff = sb.mean - sa.mean
        out.append(
            {
                "metric": key,
                first: sa.as_dict(),
                second: sb.as_dict(),
                "difference": diff,
                "paired_differences": paired,
                "difference_over_std": diff / spread if spread > 0 else None,
            }
        )
    return out


def format_comparison(result: list[dict[str, Any]], first: str, second: str) -> str:
    """A Markdown table of `compare`'s result."""
    lines = [
        f"| metric | {first} | {second} | {second} - {first} | per seed | difference / std |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result:
        ratio = "" if r["difference_over_std"] is None else f"{r['difference_over_std']:+.1f}"
        paired = ", ".join(f"{d:+.4f}" for d in r["paired_differences"])
        cells = [f"{r[n]['mean']:.4f} ± {r[n]['std']:.4f}" for n in (first, second)]
        lines.append(f"| {r['metric']} | {cells[0]} | {cells[1]} | {r['difference']:+.4f} | {paired} | {ratio} |")
    return "\n".join(lines)
