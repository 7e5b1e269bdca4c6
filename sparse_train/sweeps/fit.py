"""Scaling-law fits to a sweep's results, with bootstrap intervals and a held-out check.

Laws (N = active parameters without the input embedding, D = training tokens, E = routed
experts, 1 for dense models, G = granularity, the dense FFN width over the expert width):

    chinchilla  L = e + a N^-alpha + b D^-beta                 (Hoffmann et al. 2022, eq. 2)
    moe         L = c + (a + g G^-gamma) E^-delta N^-alpha + b D^-beta

`moe` is the fine-grained MoE law of Krajewski et al. (2024, "Scaling Laws for Fine-Grained
Mixture of Experts", eq. 3: c + (g / G^gamma + a) / N^alpha + b / D^beta) with the expert
count entering as a power law E^-delta in the parameter term, the log-linear regime of Clark
et al. (2022, "Unified Scaling Laws for Routed Language Models"; their saturation at large E
is not modelled, these sweeps stay at E <= 64). Dense models are E = G = 1.

Fitting follows Hoffmann et al.: the Huber loss (delta 1e-3) of log L_predicted - log L_observed,
minimised with L-BFGS-B from the 8 best points of an initialisation grid (the best result kept),
coefficients fitted as logs
so they stay positive. Intervals: the 2.5th and 97.5th percentiles of the parameters refitted
on bootstrap resamples of the points. Validation: fit on all but the largest-compute points,
predict those, report the relative errors.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sparse_train.sweeps.spec import SweepError

HUBER_DELTA = 1e-3
HOLDOUT_FRACTION = 0.2
DEFAULT_BOUNDS = (-20.0, 20.0)  # log-coefficients: e^-20 is zero for every loss we fit
SCREENED_STARTS = 8  # of the initialisation grid, the best by objective value are refined


@dataclass(frozen=True)
class Law:
    name: str
    params: tuple[str, ...]
    log_params: tuple[str, ...]  # fitted as logs (positive coefficients)
    predict: Callable[[dict[str, float], dict[str, np.ndarray]], np.ndarray]
    inits: dict[str, tuple[float, ...]]  # per parameter (log-space for log_params), crossed into a grid
    bounds: dict[str, tuple[float, float]]


def _chinchilla(p, x):
    return p["e"] + p["a"] * x["N"] ** -p["alpha"] + p["b"] * x["D"] ** -p["beta"]


def _moe(p, x):
    coef = (p["a"] + p["g"] * x["G"] ** -p["gamma"]) * x["E"] ** -p["delta"]
    return p["c"] + coef * x["N"] ** -p["alpha"] + p["b"] * x["D"] ** -p["beta"]


EXPONENT = (0.05, 2.0)
LAWS = {
    "chinchilla": Law(
        "chinchilla",
        ("e", "a", "alpha", "b", "beta"),
        ("e", "a", "b"),
        _chinchilla,
        {"e": (-1.0, 0.5), "a": (0.0, 4.0, 8.0), "alpha": (0.2, 0.6), "b": (0.0, 4.0, 8.0), "beta": (0.2, 0.6)},
        {"alpha": EXPONENT, "beta": EXPONENT},
    ),
    "moe": Law(
        "moe",
        ("c", "a", "g", "gamma", "delta", "alpha", "b", "beta"),
        ("c", "a", "g", "b"),
        _moe,
        {
            "c": (-1.0, 0.5),
            "a": (0.0, 5.0),
            "g": (-2.0, 3.0),
            "gamma": (0.5,),
            "delta": (0.1,),
            "alpha": (0.2, 0.6),
            "b": (0.0, 5.0),
            "beta": (0.2, 0.6),
        },
        {"alpha": EXPONENT, "beta": EXPONENT, "gamma": (0.0, 3.0), "delta": (0.0, 1.0)},
    ),
}


@dataclass
class Data:
    x: dict[str, np.ndarray]  # N, D, E, G, flops
    loss: np.ndarray
    ids: list[str]
    families: list[str] | None = None  # family_of() each point, when read from a results table

    def __len__(self) -> int:
        return len(self.loss)

    def subset(self, idx: np.ndarray) -> Data:
        fams = None if self.families is None else [self.families[i] for i in idx]
        return Data({k: v[idx] for k, v in self.x.items()}, self.loss[idx], [self.ids[i] for i in idx], fams)


def family_of(row: dict[str, str]) -> str:
    """A results row's model family: dense, `moe E=8 G=2`, or `fff 8 leaves`."""
    if row["ffn"] == "fff":
        return f"fff {row['num_experts']} leaves"
    if row["ffn"] == "moe":
        return f"moe E={row['num_experts']} G={float(row['granularity']):g}"
    return row["ffn"]


def read_results(directory: Path, metric: str = "final_val_loss") -> Data:
    path = Path(directory) / "results.csv"
    if not path.is_file():
        raise SweepError(f"{path} does not exist (run `sparse-train sweep run SPEC --out {directory}` first)")
    reader = csv.DictReader(path.open())
    missing = [
        c
        for c in ("status", "ffn", "params_active", "tokens", "num_experts", "granularity", "flops", metric)
        if c not in (reader.fieldnames or [])
    ]
    if missing:
        raise SweepError(f"{path} lacks the columns {missing}: not a sweep results table")
    rows = [r for r in reader if r["status"] == "done"]
    rows = [r for r in rows if r.get(metric) not in ("", None) and math.isfinite(float(r[metric]))]
    x = {
        "N": np.array([float(r["params_active"]) for r in rows]),
        "D": np.array([float(r["tokens"]) for r in rows]),
        "E": np.array([float(r["num_experts"]) for r in rows]),
        "G": np.array([float(r["granularity"]) for r in rows]),
        "flops": np.array([float(r["flops"]) for r in rows]),
    }
    return Data(
        x, np.array([float(r[metric]) for r in rows]), [r["trial_id"] for r in rows], [family_of(r) for r in rows]
    )


def _unpack(law: Law, theta: np.ndarray) -> dict[str, float]:
    return {n: (math.exp(v) if n in law.log_params else float(v)) for n, v in zip(law.params, theta, strict=True)}


def _objective(law: Law, data: Data):
    log_obs = np.log(data.loss)

    def f(theta: np.ndarray) -> float:
        pred = law.predict(_unpack(law, theta), data.x)
        if not np.all(np.isfinite(pred)) or np.any(pred <= 0):
            return 1e6
        r = np.log(pred) - log_obs
        small = np.abs(r) <= HUBER_DELTA
        huber = np.where(small, 0.5 * r**2, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA))
        # / delta: the same minimiser, on a scale where L-BFGS's gradient tolerance means something
        return float(np.sum(huber) / HUBER_DELTA)

    return f


def _scipy_optimize():
    try:
        from scipy import optimize
    except ImportError:
        raise SweepError("fitting needs scipy: pip install 'sparse_train[sweep]'") from None
    return optimize


def _minimise(law: Law, data: Data, starts: list[np.ndarray]) -> tuple[np.ndarray, float]:
    minimize = _scipy_optimize().minimize

    f = _objective(law, data)
    bounds = [law.bounds.get(n, DEFAULT_BOUNDS) for n in law.params]
    best_theta, best = None, math.inf
    if len(starts) > SCREENED_STARTS:  # descend only from the most promising initialisations
        starts = sorted(starts, key=f)[:SCREENED_STARTS]
    for start in starts:
        res = minimize(
            f,
            start,
            method="L-BFGS-B",
            bounds=bounds,
            options={"maxiter": 20000, "maxfun": 200000, "ftol": 1e-15, "gtol": 1e-9},
        )
        if res.fun < best:
            best_theta, best = res.x, float(res.fun)
    return best_theta, best


def _grid(law: Law) -> list[np.ndarray]:
    import itertools

    return [np.array(v, dtype=float) for v in itertools.product(*(law.inits[n] for n in law.params))]


def fit(data: Data, law_name: str, *, bootstrap: int = 100, seed: int = 0) -> dict[str, Any]:
    law = LAWS.get(law_name)
    if law is None:
        raise SweepError(f"unknown law {law_name!r}; allowed: {', '.join(LAWS)}")
    if len(data) < len(law.params):
        raise SweepError(
            f"the {law.name} law has {len(law.params)} parameters: it needs at least {len(law.params)} finished "
            f"trials, the results hold {len(data)}"
        )
    theta, objective = _minimise(law, data, _grid(law))
    params = _unpack(law, theta)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        idx = rng.integers(0, len(data), len(data))
        t, _ = _minimise(law, data.subset(idx), [theta])
        samples.append([_unpack(law, t)[n] for n in law.params])
    samples_arr = np.array(samples) if samples else np.empty((0, len(law.params)))
    ci = (
        {
            n: [float(np.percentile(samples_arr[:, i], 2.5)), float(np.percentile(samples_arr[:, i], 97.5))]
            for i, n in enumerate(law.params)
        }
        if bootstrap
        else {}
    )
    pred = law.predict(params, data.x)
    bounds = [law.bounds.get(n, DEFAULT_BOUNDS) for n in law.params]
    # a parameter pinned at a bound is not identified by the data (its interval collapses there)
    # (a log-coefficient below 1e-6 is zero to the optimiser: its gradient vanishes before -20)
    at_bound = [
        n
        for n, v, (lo, hi) in zip(law.params, theta, bounds, strict=True)
        if min(v - lo, hi - v) < 1e-4 or (n in law.log_params and v < math.log(1e-6))
    ]
    return {
        "law": law.name,
        "params": params,
        "ci95": ci,
        "at_bound": at_bound,
        "bootstrap": bootstrap,
        "points": len(data),
        "huber_delta": HUBER_DELTA,
        "objective": objective,
        "rms_log_residual": float(np.sqrt(np.mean((np.log(pred) - np.log(data.loss)) ** 2))),
        "holdout": holdout(data, law),
    }


def fit_families(data: Data, law_name: str, *, bootstrap: int = 100, base: str = "dense") -> dict[str, Any]:
    """The law fitted to each model family on its own, and where each family's fitted loss
    crosses the base family's at equal active parameters (a law like `moe` only scales the
    parameter term with E, so it cannot say that MoE loses at few tokens and wins at many;
    separate fits can)."""
    assert data.families is not None, "family fits need a results table"
    if base not in data.families:
        raise SweepError(f"no {base} trials to compare the other families with")
    fits = {}
    for fam in sorted(set(data.families)):
        idx = np.array([i for i, f in enumerate(data.families) if f == fam])
        try:
            fits[fam] = fit(data.subset(idx), law_name, bootstrap=bootstrap)
        except SweepError as err:
            raise SweepError(f"family {fam}: {err.message}") from None
    cross = {}
    for fam in fits:
        if fam == base:
            continue
        idx = np.array([i for i, f in enumerate(data.families) if f == fam])
        span = (float(data.x["D"][idx].min()), float(data.x["D"][idx].max()))
        cross[fam] = [
            crossover(fits[fam], fits[base], n, data.x["E"][idx[0]], data.x["G"][idx[0]], span)
            for n in sorted({float(data.x["N"][i]) for i in idx})
        ]
    return {"law": law_name, "base": base, "families": fits, "crossover": cross}


def crossover(
    fam: dict[str, Any], base: dict[str, Any], n: float, e: float, g: float, tokens: tuple[float, float]
) -> dict[str, Any]:
    """At N active parameters, within the sweep's token range (no extrapolation): where `fam`'s
    fitted loss crosses the base's (None if it does not) and the gaps (fam - base, nats) at
    both ends of the range."""
    from scipy.optimize import brentq

    def gap(log_d: float) -> float:
        d = math.exp(log_d)
        return float(predict(fam, N=n, D=d, E=e, G=g) - predict(base, N=n, D=d))

    grid = np.linspace(math.log(tokens[0]), math.log(tokens[1]), 100)
    gaps = np.array([gap(v) for v in grid])
    changes = np.nonzero(np.sign(gaps[:-1]) != np.sign(gaps[1:]))[0]
    cross = math.exp(brentq(gap, grid[changes[0]], grid[changes[0] + 1])) if len(changes) else None
    return {
        "params_active": n,
        "crossing_tokens": cross,
        "crossing_tokens_per_param": cross and cross / n,
        "tokens": list(tokens),
        "gap_at_fewest_tokens": float(gaps[0]),
        "gap_at_most_tokens": float(gaps[-1]),
    }


def holdout(data: Data, law: Law) -> dict[str, Any]:
    """Fit on the smaller-compute runs, predict the largest ones."""
    order = np.argsort(data.x["flops"])
    n_out = max(1, int(round(HOLDOUT_FRACTION * len(data))))
    fit_idx, out_idx = order[:-n_out], order[-n_out:]
    if len(fit_idx) < len(law.params):
        return {"skipped": f"{len(fit_idx)} points left to fit after holding out {n_out}; needs {len(law.params)}"}
    part = data.subset(fit_idx)
    theta, _ = _minimise(law, part, _grid(law))
    params = _unpack(law, theta)
    held = data.subset(out_idx)
    pred = law.predict(params, held.x)
    rows = [
        {"trial_id": t, "flops": float(c), "observed": float(o), "predicted": float(p), "rel_error": float((p - o) / o)}
        for t, c, o, p in zip(held.ids, held.x["flops"], held.loss, pred, strict=True)
    ]
    return {
        "fit_on": len(fit_idx),
        "held_out": rows,
        "mean_abs_rel_error": float(np.mean([abs(r["rel_error"]) for r in rows])),
    }


def predict(result: dict[str, Any], **x: np.ndarray | float) -> np.ndarray:
    law = LAWS[result["law"]]
    full = {k: np.asarray(x.get(k, 1.0), dtype=float) for k in ("N", "D", "E", "G")}
    return law.predict(result["params"], full)


def optimal(
    result: dict[str, Any], flops: float, *, experts: list[int] | None = None, granularities: list[float] | None = None
) -> dict[str, Any]:
    """The allocation minimising the fitted loss at a compute budget C = 6 N D (N active), over
    the given expert counts and granularities (dense, E = 1, only at G = 1: there is no finer
    dense model); `alternatives` holds the best allocation of every (E, G)."""
    minimize_scalar = _scipy_optimize().minimize_scalar
    if flops <= 0:
        raise SweepError(f"--flops must be > 0, got {flops}")
    options = [(1, 1.0)]
    if result["law"] != "chinchilla":
        options = [(e, float(g)) for e in experts or [1] for g in granularities or [1] if e > 1 or g == 1] or options
    candidates = []
    for e, g in options:

        def loss_at(log_n: float, e=e, g=g) -> float:
            n = math.exp(log_n)
            return float(predict(result, N=n, D=flops / (6 * n), E=e, G=g))

        res = minimize_scalar(loss_at, bounds=(math.log(1e3), math.log(flops / 6 / 1e3)), method="bounded")
        n = math.exp(res.x)
        tokens = flops / (6 * n)
        candidates.append(
            {
                "flops": flops,
                "params_active": n,
                "tokens": tokens,
                "num_experts": e,
                "granularity": g,
                "predicted_loss": float(res.fun),
                "tokens_per_param": tokens / n,
            }
        )
    candidates.sort(key=lambda c: c["predicted_loss"])
    return {**candidates[0], "alternatives": candidates[1:]}
