"""Sweep figures (PNG and SVG): loss vs compute with the fitted law and frontier, residuals, and
MoE vs dense at equal active parameters."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from sparse_train.sweeps import fit as fitting
from sparse_train.train.plots import plt

_family = fitting.family_of


def _rows(directory: Path, metric: str) -> list[dict[str, str]]:
    rows = [r for r in csv.DictReader((Path(directory) / "results.csv").open()) if r["status"] == "done"]
    return [r for r in rows if r.get(metric) not in ("", None)]


def _save(fig, out: Path, name: str) -> list[Path]:
    paths = [out / f"{name}.png", out / f"{name}.svg"]
    for p in paths:
        fig.savefig(p, dpi=110)
    plt.close(fig)
    return paths


def plot_sweep(directory: Path, result: dict[str, Any] | None, metric: str = "final_val_loss") -> list[Path]:
    """Write DIR/plots/{loss_vs_compute,residuals,moe_vs_dense}.{png,svg}; residuals need a fit."""
    directory = Path(directory)
    out = directory / "plots"
    out.mkdir(exist_ok=True)
    rows = _rows(directory, metric)
    families = sorted({_family(r) for r in rows})
    colours = {f: plt.cm.tab10(i % 10) for i, f in enumerate(families)}
    written = []

    # 1. loss vs compute, with each (family, size)'s fitted curve over D and the frontier
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for fam in families:
        mine = [r for r in rows if _family(r) == fam]
        losses = [float(r[metric]) for r in mine]
        ax.scatter([float(r["flops"]) for r in mine], losses, color=colours[fam], label=fam, s=22)
        if result is None:
            continue
        e, g = float(mine[0]["num_experts"]), float(mine[0]["granularity"])
        for n in sorted({float(r["params_active"]) for r in mine}):
            size = [r for r in mine if float(r["params_active"]) == n]
            tokens = [float(r["tokens"]) for r in size]
            per_token = float(size[0]["flops"]) / float(size[0]["tokens"])  # 6 N + attention, as the points
            d = np.geomspace(min(tokens) / 2, max(tokens) * 2, 40)
            ax.plot(per_token * d, fitting.predict(result, N=n, D=d, E=e, G=g), color=colours[fam], lw=0.8, alpha=0.6)
    if result is not None and rows:
        flops = [float(r["flops"]) for r in rows]
        budgets = np.geomspace(min(flops), max(flops), 30)  # no extrapolation beyond the sweep
        experts = sorted({int(float(r["num_experts"])) for r in rows})
        grans = sorted({float(r["granularity"]) for r in rows})
        front = [fitting.optimal(result, c, experts=experts, granularities=grans)["predicted_loss"] for c in budgets]
        ax.plot(budgets, front, "k--", lw=1.2, label=f"compute-optimal frontier ({result['law']} fit, C = 6 N D)")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel(metric.replace("_", " ") + " (nats/token)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    written += _save(fig, out, "loss_vs_compute")

    # 2. residuals of the fit
    if result is not None:
        data = fitting.read_results(directory, metric)
        pred = fitting.LAWS[result["law"]].predict(result["params"], data.x)
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        ax.axhline(0, color="k", lw=0.8)
        resid = np.log(data.loss) - np.log(pred)
        for fam in families:  # by family: a law that misses one family's trend shows it here
            mine = [i for i, f in enumerate(data.families or []) if f == fam]
            ax.scatter(data.x["flops"][mine], resid[mine], s=22, color=colours[fam], label=fam)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.legend(fontsize=7)
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel("log observed - log predicted")
        ax.set_title(f"residuals of the {result['law']} fit (rms {result['rms_log_residual']:.4f})")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        written += _save(fig, out, "residuals")

    # 3. MoE vs dense at equal active parameters: losses at the most tokens, and the gap over tokens
    families_fit = _families_fit(directory)
    fig, (ax, gap_ax) = plt.subplots(1, 2, figsize=(11.5, 4.2))
    for fam in families:
        mine = [r for r in rows if _family(r) == fam]
        most = max(float(r["tokens"]) for r in mine)
        by_size: dict[float, list[float]] = {}
        for r in mine:
            if float(r["tokens"]) == most:
                by_size.setdefault(float(r["params_active"]), []).append(float(r[metric]))
        xs = sorted(by_size)
        ax.plot(
            xs, [float(np.mean(by_size[x])) for x in xs], "o-", color=colours[fam], label=f"{fam} ({most:.3g} tokens)"
        )
        if fam != "dense":
            _gap_panel(gap_ax, rows, fam, metric, colours[fam], families_fit)
    ax.set_xscale("log")
    ax.set_xlabel("active parameters (without the input embedding)")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title("MoE vs dense at equal active parameters")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    gap_ax.axhline(0, color="k", lw=0.8)
    gap_ax.set_xscale("log")
    gap_ax.set_xlabel("training tokens")
    gap_ax.set_ylabel("loss - dense loss at equal active params")
    gap_ax.set_title("below 0: the sparse model wins" + (" (lines: per-family fits)" if families_fit else ""))
    gap_ax.grid(alpha=0.3, which="both")
    gap_ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    written += _save(fig, out, "moe_vs_dense")
    return written


def _families_fit(directory: Path) -> dict[str, Any] | None:
    for path in sorted(Path(directory).glob("fit-*-families.json")):
        return json.loads(path.read_text())
    return None


def _gap_panel(ax, rows, fam: str, metric: str, colour, families_fit: dict[str, Any] | None) -> None:
    """Observed fam - dense at matched (active parameters within 5%, tokens), one marker per
    size, and the per-family fits' gap over the same tokens."""
    dense = [r for r in rows if r["ffn"] == "dense"]
    markers = "os^vD<>p"
    sizes = sorted({float(r["params_active"]) for r in rows if _family(r) == fam})
    for i, n in enumerate(sizes):
        pairs = []
        for r in (r for r in rows if _family(r) == fam and float(r["params_active"]) == n):
            twin = [d for d in dense if d["tokens"] == r["tokens"] and abs(float(d["params_active"]) / n - 1) < 0.05]
            if twin:
                pairs.append((float(r["tokens"]), float(r[metric]) - float(np.mean([float(d[metric]) for d in twin]))))
        if not pairs:
            continue
        pairs.sort()
        ax.scatter(
            *zip(*pairs, strict=True), color=colour, marker=markers[i % len(markers)], s=24, label=f"{fam}, N={n:.3g}"
        )
        if families_fit and fam in families_fit["families"] and "dense" in families_fit["families"]:
            mine, base = families_fit["families"][fam], families_fit["families"]["dense"]
            e = float(next(r["num_experts"] for r in rows if _family(r) == fam))
            g = float(next(r["granularity"] for r in rows if _family(r) == fam))
            d = np.geomspace(pairs[0][0], pairs[-1][0], 40)
            gap = fitting.predict(mine, N=n, D=d, E=e, G=g) - fitting.predict(base, N=n, D=d)
            ax.plot(d, gap, color=colour, lw=0.8, alpha=0.7)


def plot_variants(directory: Path) -> list[Path]:
    """DIR/plots/variants.{png,svg}: per variant, validation loss (every seed and the mean ± std),
    each source's validation loss (mean ± std) and the routers' specialisation (mean ± std)."""
    from sparse_train.sweeps.variants import read_trials, sources, summarise

    directory = Path(directory)
    trials = read_trials(directory)
    rows = summarise(trials)
    out = directory / "plots"
    out.mkdir(exist_ok=True)
    names = [r.variant for r in rows]
    ys = np.arange(len(rows))
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 1.6 + 0.42 * len(rows)), sharey=True)
    _variant_panel(axes[0], rows, trials, "val_loss", ys, "validation loss (nats/token)")
    srcs = sources(rows)
    for i, src in enumerate(srcs):
        offset = (i - (len(srcs) - 1) / 2) * 0.22
        _mean_std(axes[1], rows, f"val_loss/{src}", ys + offset, plt.cm.tab10(i % 10), src)
    axes[1].set_xlabel("validation loss per source")
    if srcs:
        axes[1].legend(fontsize=7)
    _variant_panel(axes[2], rows, trials, "specialisation", ys, "specialisation (mean over MoE layers)")
    axes[0].set_yticks(ys, names, fontsize=8)
    axes[0].invert_yaxis()
    for ax in axes:
        ax.grid(alpha=0.3, axis="x")
        ax.xaxis.set_major_locator(plt.MaxNLocator(5))
    fig.suptitle(f"{directory.name}: mean ± std over seeds (dots: seeds)", fontsize=9)
    fig.tight_layout()
    return _save(fig, out, "variants")


def _variant_panel(ax, rows, trials, key: str, ys, label: str) -> None:
    index = {r.variant: i for i, r in enumerate(rows)}
    seeds = [(t.metrics[key], ys[index[t.variant]]) for t in trials if t.metrics.get(key) is not None]
    if seeds:
        ax.scatter(*zip(*seeds, strict=True), s=10, color="0.55", zorder=2)
    _mean_std(ax, rows, key, ys, "C0", None)
    ax.set_xlabel(label)


def _mean_std(ax, rows, key: str, ys, colour, label: str | None) -> None:
    points = [(r.stats[key].mean, r.stats[key].std, y) for r, y in zip(rows, ys, strict=True) if key in r.stats]
    if points:
        means, stds, where = zip(*points, strict=True)
        ax.errorbar(means, where, xerr=stds, fmt="o", ms=4, capsize=3, color=colour, label=label, zorder=3)
