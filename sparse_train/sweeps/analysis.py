"""What the `sweep fit | optimal | plot` commands do with a finished sweep's directory: fit a law and
write it beside the results, read a fit back, ask it for the compute-optimal model, and describe
fits in words."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from sparse_train.sweeps import fit as fitting
from sparse_train.sweeps.runner import RESULTS
from sparse_train.sweeps.spec import SweepError

EXPERT_LADDER = (1, 2, 4, 8, 16, 32, 64, 128)  # expert counts `optimal` considers besides the sweep's own


def fit_sweep(
    directory: Path, law: str, *, metric: str, bootstrap: int, by_family: bool = False, out: Path | None = None
) -> tuple[dict[str, Any], Path]:
    """Fit `law` to the sweep's results (each family alone with `by_family`); the fit and where it was written."""
    data = fitting.read_results(directory, metric)
    if by_family:
        result = fitting.fit_families(data, law, bootstrap=bootstrap)
    else:
        result = fitting.fit(data, law, bootstrap=bootstrap)
    result["metric"] = metric
    out = out or directory / (f"fit-{law}-families.json" if by_family else f"fit-{law}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result, out


def load_fit(directory: Path, law: str | None) -> dict[str, Any] | None:
    """The sweep's fit of `law`; with no law, the moe fit if there is one, else chinchilla, else None."""
    for name in [law] if law else ["moe", "chinchilla"]:
        path = directory / f"fit-{name}.json"
        if path.is_file():
            return json.loads(path.read_text())
    if law:
        raise SweepError(f"no {law} fit in {directory}: run `sparse-train sweep fit {directory} --law {law}` first")
    return None


def optimal_for_sweep(
    directory: Path, result: dict[str, Any], flops: float, max_experts: int | None = None
) -> dict[str, Any]:
    """The compute-optimal N, D (and E, G) at `flops` among the expert counts of the ladder up to
    `max_experts` (default: the sweep's largest) and the granularities the sweep tried."""
    with (directory / RESULTS).open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["status"] == "done"]
    observed_e = sorted({int(float(r["num_experts"])) for r in rows}) or [1]
    max_e = max_experts or max(observed_e)
    experts = sorted({e for e in [*EXPERT_LADDER, *observed_e] if e <= max_e})
    grans = sorted({float(r["granularity"]) for r in rows}) or [1.0]
    return {"law": result["law"], **fitting.optimal(result, flops, experts=experts, granularities=grans)}


def describe_fit(result: dict[str, Any]) -> str:
    """The fitted parameters with their intervals, the parameters at a search bound, the held-out check."""
    lines = [json.dumps({k: result[k] for k in ("law", "params", "ci95", "points", "rms_log_residual")}, indent=1)]
    if result["at_bound"]:
        lines.append(f"at a bound of the search (not identified by these points): {', '.join(result['at_bound'])}")
    held = result["holdout"]
    if "mean_abs_rel_error" in held:
        lines.append(
            f"held out the {len(held['held_out'])} largest-compute runs: mean |relative error| of "
            f"their predicted loss {held['mean_abs_rel_error']:.4f} (fit on {held['fit_on']})"
        )
    return "\n".join(lines)


def describe_families(result: dict[str, Any]) -> str:
    """Per family and active size: where it crosses the base family, and the gaps at either end."""
    base = result["base"]
    lines = []
    for fam, rows in result["crossover"].items():
        for r in rows:
            if r["crossing_tokens"]:
                where = (
                    f"crosses {base} at {r['crossing_tokens']:.3g} tokens ({r['crossing_tokens_per_param']:.1f}/param)"
                )
            else:
                where = "no crossing"
            lines.append(
                f"{fam}, N_active {r['params_active']:.3g}: {where}; {fam} - {base} = "
                f"{r['gap_at_fewest_tokens']:+.4f} at {r['tokens'][0]:.3g} tokens, "
                f"{r['gap_at_most_tokens']:+.4f} at {r['tokens'][1]:.3g}"
            )
    return "\n".join(lines)
