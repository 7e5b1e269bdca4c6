"""Figures users look at: the loss curve and the expert-load / leaf-usage heatmap (matplotlib, no display)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a screen
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def load_heatmap(load_LE: np.ndarray, layer_names: Sequence[str], step: int, what: str = "expert") -> Figure:
    """Rows: sparse layers; columns: experts (or FFF leaves); colour: load relative to uniform (1.0 = even)."""
    relative = load_LE * load_LE.shape[1]
    columns = load_LE.shape[1]
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * min(columns, 40), 1.0 + 0.45 * load_LE.shape[0]))
    image = ax.imshow(relative, cmap="viridis", vmin=0.0, vmax=max(2.0, float(relative.max())), aspect="auto")
    step_ticks = max(1, columns // 32)  # at most ~32 labelled columns
    ax.set_xticks(range(0, columns, step_ticks))
    ax.set_yticks(range(load_LE.shape[0]), labels=list(layer_names))
    ax.set_xlabel(what)
    ax.set_title(f"{what} load / uniform share, step {step}")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def loss_curve(records: Sequence[dict]) -> Figure:
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    train = [(r["step"], r["lm_loss"]) for r in records if "lm_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if train:
        ax.plot(*zip(*train, strict=True), label="train lm loss")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def save(fig: Figure, path: str) -> None:
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare_runs(runs: Sequence[tuple[str, Sequence[dict], int]], smooth: int = 5) -> Figure:
    """Loss curves of several runs on one step axis: (label, metrics records, step offset), e.g.
    a run continued from another's final checkpoint starts at that run's last step. Train loss is
    a moving average over `smooth` records; validation losses are marked."""
    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    for label, records, offset in runs:
        train = [(r["step"] + offset, r["lm_loss"]) for r in records if "lm_loss" in r]
        val = [(r["step"] + offset, r["val_loss"]) for r in records if "val_loss" in r]
        colour = None
        if train:
            steps, losses = zip(*train, strict=True)
            window = max(1, min(smooth, len(losses)))
            smoothed = np.convolve(losses, np.ones(window) / window, mode="valid")
            (line,) = ax.plot(steps[window - 1 :], smoothed, label=f"{label} (train)")
            colour = line.get_color()
        if val:
            ax.plot(*zip(*val, strict=True), "o--", color=colour, markersize=4, label=f"{label} (validation)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_runs(runs: Sequence[tuple[str, Sequence[dict], int]], out: Path, title: str | None = None) -> list[Path]:
    """compare_runs written as OUT.png and OUT.svg; returns their paths."""
    fig = compare_runs(runs)
    if title:
        fig.axes[0].set_title(title)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [Path(f"{out}{suffix}") for suffix in (".png", ".svg")]
    for path in paths:
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return paths
