"""The fitter recovers known laws from noisy synthetic points, inside its bootstrap intervals;
too few points are refused; the compute-optimal allocation matches the closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sparse_train.sweeps.fit import LAWS, Data, fit, fit_families, optimal
from sparse_train.sweeps.spec import SweepError


def _synthetic(law: str, truth: dict[str, float], rows: list[tuple[float, float, float, float]], seed: int = 0):
    a = np.array(rows, dtype=float)
    x = {"N": a[:, 0], "D": a[:, 1], "E": a[:, 2], "G": a[:, 3], "flops": 6 * a[:, 0] * a[:, 1]}
    noise = np.exp(np.random.default_rng(seed).normal(0, 0.005, len(a)))  # 0.5% multiplicative
    return Data(x, LAWS[law].predict(truth, x) * noise, [str(i) for i in range(len(a))])


CHINCHILLA = {"e": 1.7, "a": 400.0, "alpha": 0.34, "b": 410.0, "beta": 0.28}
MOE = {"c": 1.6, "a": 50.0, "g": 30.0, "gamma": 0.6, "delta": 0.15, "alpha": 0.3, "b": 300.0, "beta": 0.27}


def test_chinchilla_parameters_are_recovered_inside_their_intervals():
    rows = [(n, d, 1, 1) for n in np.logspace(5, 8, 5) for d in np.logspace(7, 10, 5)]
    result = fit(_synthetic("chinchilla", CHINCHILLA, rows), "chinchilla", bootstrap=40)
    for name, true in CHINCHILLA.items():
        lo, hi = result["ci95"][name]
        assert lo <= true <= hi, f"{name}: {true} outside [{lo:.4g}, {hi:.4g}]"
        assert hi - lo < 0.5 * abs(true), f"{name}: an interval this wide says nothing"
    assert result["rms_log_residual"] < 0.01
    assert result["at_bound"] == []
    below = fit(_synthetic("chinchilla", {**CHINCHILLA, "e": -0.3}, rows), "chinchilla", bootstrap=0)
    assert below["at_bound"] == ["e"], "an irreducible loss below 0 fits as e = 0, at its bound"
    assert result["holdout"]["mean_abs_rel_error"] < 0.02  # the largest runs, predicted from the others


@pytest.mark.slow
def test_moe_law_parameters_are_recovered_inside_their_intervals():
    rows = [
        (n, d, e, g)
        for e in (1, 4, 16)
        for g in ((1,) if e == 1 else (1, 2, 4, 8))
        for n in np.logspace(5, 7.5, 3)
        for d in np.logspace(7, 9.5, 3)
    ]
    result = fit(_synthetic("moe", MOE, rows), "moe", bootstrap=100)
    for name, true in MOE.items():
        lo, hi = result["ci95"][name]
        assert lo <= true <= hi, f"{name}: {true} outside [{lo:.4g}, {hi:.4g}]"
    assert result["params"]["delta"] > 0.1, "more experts lower the loss at equal active parameters"


def test_too_few_points_are_refused_and_say_how_many_are_needed():
    rows = [(n, 1e9, 1, 1) for n in np.logspace(5, 8, 4)]
    with pytest.raises(
        SweepError, match="the chinchilla law has 5 parameters: it needs at least 5 finished trials, the results hold 4"
    ):
        fit(_synthetic("chinchilla", CHINCHILLA, rows), "chinchilla")
    with pytest.raises(SweepError, match="unknown law 'kaplan'"):
        fit(_synthetic("chinchilla", CHINCHILLA, rows), "kaplan")


def test_compute_optimal_allocation_matches_the_closed_form():
    """Hoffmann et al.: N_opt = G (C/6)^(beta/(alpha+beta)), G = (alpha a / (beta b))^(1/(alpha+beta))."""
    p = CHINCHILLA
    result = {"law": "chinchilla", "params": p}
    for c in (1e18, 1e21):
        best = optimal(result, c)
        g = (p["alpha"] * p["a"] / (p["beta"] * p["b"])) ** (1 / (p["alpha"] + p["beta"]))
        n_opt = g * (c / 6) ** (p["beta"] / (p["alpha"] + p["beta"]))
        assert best["params_active"] == pytest.approx(n_opt, rel=1e-3)
        assert best["tokens"] == pytest.approx(c / 6 / n_opt, rel=1e-3)
    with pytest.raises(SweepError, match="--flops must be > 0"):
        optimal(result, -1.0)
    moe = {"law": "moe", "params": MOE}
    picked = optimal(moe, 1e20, experts=[1, 8, 64], granularities=[1, 8])
    assert (picked["num_experts"], picked["granularity"]) == (64, 8)  # delta, g > 0: more, finer experts help
    assert math.isfinite(picked["predicted_loss"])
    options = {(a["num_experts"], a["granularity"]) for a in picked["alternatives"]}
    assert options == {(1, 1.0), (8, 1.0), (8, 8.0), (64, 1.0)}, "no dense model at G > 1"
    assert all(a["predicted_loss"] >= picked["predicted_loss"] for a in picked["alternatives"])


def test_family_fits_find_where_moe_starts_beating_dense():
    """MoE worse at few tokens (larger D term) and better at many (smaller N term): the
    per-family fits must place the crossing where the true laws cross."""
    dense_truth = {"e": 1.0, "a": 60.0, "alpha": 0.4, "b": 40.0, "beta": 0.25}
    moe_truth = {"e": 1.0, "a": 20.0, "alpha": 0.4, "b": 60.0, "beta": 0.25}
    rows = [(n, d, 1, 1) for n in np.logspace(4.5, 6, 4) for d in np.logspace(5.5, 8, 5)]
    dense, moe = _synthetic("chinchilla", dense_truth, rows, seed=1), _synthetic("chinchilla", moe_truth, rows, seed=2)
    moe.x["E"] = np.full(len(rows), 8.0)
    x = {k: np.concatenate([dense.x[k], moe.x[k]]) for k in dense.x}
    data = Data(
        x,
        np.concatenate([dense.loss, moe.loss]),
        [str(i) for i in range(2 * len(rows))],
        ["dense"] * len(rows) + ["moe E=8 G=1"] * len(rows),
    )
    result = fit_families(data, "chinchilla", bootstrap=0)
    assert set(result["families"]) == {"dense", "moe E=8 G=1"}
    for row in result["crossover"]["moe E=8 G=1"]:
        n = row["params_active"]
        # the truth: 40 N^-0.4 = 20 D^-0.25 (a N^-alpha saved = b D^-beta added)
        true_d = (20.0 / (40.0 * n**-0.4)) ** (1 / 0.25)
        if true_d > 10**8:
            assert row["crossing_tokens"] is None and row["gap_at_most_tokens"] > 0
        else:
            assert row["crossing_tokens"] == pytest.approx(true_d, rel=0.25)
            assert row["gap_at_fewest_tokens"] > 0 > row["gap_at_most_tokens"]
    with pytest.raises(SweepError, match="no dense trials"):
        fit_families(data.subset(np.arange(len(rows), 2 * len(rows))), "chinchilla", bootstrap=0)
