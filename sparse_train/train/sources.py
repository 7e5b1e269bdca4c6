"""Evaluation per source of a data mixture: validation loss and routing per source.

With data.mixture, every source is evaluated on its own `train.eval_batches` validation
batches, so every source contributes the same number of tokens. Recorded at each evaluation
(docs/data.md, "Per-source evaluation"):

    val_loss                                mean over sources (the loss of the pooled validation set)
    val_loss/<source>                       that source's validation loss
    <kind>/<layer>/<load name>/<source>     that source's load distribution over the layer's
                                            experts (or leaves), a list (metrics.jsonl only)
    <kind>/<layer>/specialisation           mean over sources of KL(p_source || p_overall), nats

p_source is the share of the layer's assignments that go to each expert on the source's
validation tokens; p_overall is the mean of the sources' p (the pooled validation set, every
source equally represented). The score is 0 when routing ignores the source and at most
ln(number of sources); it is the mutual information between the source and the chosen expert
when every source is equally likely.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from sparse_train.models.sparse import LOAD_NAMES


@dataclass
class SourceEvaluation:
    """Validation loss and per-layer load [layers, E] of each source, in mixture order."""

    losses: dict[str, float]
    loads: dict[str, np.ndarray]

    @property
    def val_loss(self) -> float:
        """Over the pooled validation set: every source has the same number of tokens."""
        return float(np.mean(list(self.losses.values())))

    @property
    def load_LE(self) -> np.ndarray:
        """The pooled load per layer: the mean of the sources' distributions."""
        return np.mean(np.stack([_normalise(load) for load in self.loads.values()]), axis=0)


def _normalise(load_LE: np.ndarray) -> np.ndarray:
    """Rows as distributions (an all-zero row stays zero: a layer that routed nothing)."""
    load_LE = np.asarray(load_LE, dtype=np.float64)
    totals = load_LE.sum(axis=-1, keepdims=True)
    return np.divide(load_LE, totals, out=np.zeros_like(load_LE), where=totals > 0)


def kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) in nats; terms with p = 0 count zero. q must be positive wherever p is."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    mask = p > 0
    if np.any(q[mask] <= 0):
        raise ValueError("KL(p || q) is infinite: q is zero where p is not")
    # never negative; rounding (q a mean of rows equal to p) can land a hair below zero
    return max(0.0, float(np.sum(p[mask] * np.log(p[mask] / q[mask]))))


def specialisation(p_SE: np.ndarray) -> float:
    """Mean over sources (rows) of KL(p_source || p_overall), p_overall the rows' mean; in nats.
    Rows are normalised to distributions first."""
    p_SE = _normalise(p_SE)
    overall = p_SE.mean(axis=0)
    return float(np.mean([kl_divergence(row, overall) for row in p_SE]))


def source_records(result: SourceEvaluation, layer_names: list[str], kind: str) -> dict[str, Any]:
    """The evaluation's per-source metrics (without `step`), named as the module doc lists."""
    record: dict[str, Any] = {"val_loss": result.val_loss}
    record.update({f"val_loss/{name}": loss for name, loss in result.losses.items()})
    if not layer_names or not result.loads:
        return record
    per_source = {name: _normalise(load) for name, load in result.loads.items()}
    for i, layer in enumerate(layer_names):
        prefix = f"{kind}/{layer}"
        for name, load_LE in per_source.items():
            record[f"{prefix}/{LOAD_NAMES[kind]}/{name}"] = [round(float(v), 5) for v in load_LE[i]]
        record[f"{prefix}/specialisation"] = specialisation(np.stack([p[i] for p in per_source.values()]))
    return record
