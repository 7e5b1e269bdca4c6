"""How close each converted FFN is to the dense one, on held-out calibration tokens.

For every converted block and every number of selected experts (leaves) k, the relative
error ||y_converted - y_dense|| / ||y_dense|| (Frobenius, over the held-out tokens) and the
fraction of the dense FFN's parameters a token uses: k experts' weights, the shared experts,
and the router (or the tree's node neurons), all of which every token reads. An FFF is also
measured in its inference form ("hard": the tree descent to one leaf). As a control, every
row also gives the error of the same experts under a random router (`rel_error_random_router`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from sparse_train.config import Config
from sparse_train.lazy import whole
from sparse_train.models.experts import SwiGLU
from sparse_train.models.fff import FFFLayer
from sparse_train.models.moe import MoELayer
from sparse_train.upcycle.calibration import Calibration

REPORT_FILE = "conversion_report.json"


def _k_values(n: int) -> list[int]:
    """Every k up to 16 experts; powers of two (and n) beyond."""
    if n <= 16:
        return list(range(1, n + 1))
    return sorted({2**p for p in range(int(math.log2(n)) + 1)} | {n})


def _block_state(state: Mapping[str, Any], i: int) -> dict[str, torch.Tensor]:
    """Block i's FFN tensors (read, or converted, now: the names are chosen before any is read)."""
    prefix = f"blocks.{i}.ffn."
    return {k[len(prefix) :]: whole(state[k]).float() for k in state if k.startswith(prefix)}


def _layers(cfg: Config, k: int) -> list[tuple[str, torch.nn.Module]]:
    """(label, converted FFN selecting k experts or leaves) for the report's rows at this k."""
    d = cfg.model.d_model
    if cfg.model.ffn == "fff":
        rows = [(f"top-{k}", FFFLayer(d, replace(cfg.fff, mode="topk_paths", top_k=k, combine="unit")).train())]
        if k == 1:
            hard = replace(cfg.fff, mode="hard", inference_backend="torch")  # the reference descent, no build
            rows.append(("hard", FFFLayer(d, hard).eval()))
        return rows
    return [(f"top-{k}", MoELayer(d, cfg.moe, replace(cfg.router, top_k=k)).train())]


def _active_params(layer: torch.nn.Module, k: int, label: str) -> int:
    """Parameters one token reads: k experts (one leaf for "hard") plus everything not per expert."""
    per_expert = sum(p[0].numel() for p in layer.experts.parameters())
    others = sum(p.numel() for name, p in layer.named_parameters() if not name.startswith("experts."))
    return (1 if label == "hard" else k) * per_expert + others


def _rel_error(y: torch.Tensor, y_dense: torch.Tensor) -> float:
    return float((y - y_dense).norm() / y_dense.norm().clamp_min(1e-30))


def _random_routing(block: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The control: the same experts, the router (or node neurons) replaced by Gaussian rows of
    the fitted ones' scale, node biases zero. What the calibration's router fit is worth."""
    g = torch.Generator().manual_seed(seed)
    out = dict(block)
    for name in ("router.weight", "tree.node_weight"):
        if name in out:
            out[name] = torch.randn(out[name].shape, generator=g) * out[name].std()
    if "tree.node_bias" in out:
        out["tree.node_bias"] = torch.zeros_like(out["tree.node_bias"])
    return out


@torch.no_grad()
def conversion_report(dense_cfg: Config, dense_state, cfg: Config, state, calib: Calibration) -> dict[str, Any]:
    m = dense_cfg.model
    dense_params = 3 * m.d_model * m.ffn_hidden
    n_experts = cfg.fff.num_leaves if cfg.model.ffn == "fff" else cfg.moe.num_experts
    blocks: dict[str, list[dict[str, Any]]] = {}
    for i in cfg.model.sparse_layers:
        dense = SwiGLU(m.d_model, m.ffn_hidden)
        dense.load_state_dict(_block_state(dense_state, i))
        x = calib.held_out[i]
        y_dense = dense(x)
        rows = []
        for k in _k_values(n_experts):
            for label, layer in _layers(cfg, k):
                layer.load_state_dict(_block_state(state, i))
                y, _ = layer(x[None])  # one "sequence" of all held-out tokens
                layer.load_state_dict(_random_routing(_block_state(state, i), i))
                y_random, _ = layer(x[None])
                rows.append(
                    {
                        "selected": label,
                        "top_k": k,
                        "rel_error": _rel_error(y[0], y_dense),
                        "rel_error_random_router": _rel_error(y_random[0], y_dense),
                        "active_fraction": _active_params(layer, k, label) / dense_params,
                    }
                )
        blocks[str(i)] = rows
    return {
        "calibration": {
            "source": calib.source,
            "tokens": calib.num_tokens,
            "held_out_tokens": int(next(iter(calib.held_out.values())).shape[0]),
        },
        "blocks": blocks,
    }


def write_report(report: dict[str, Any], directory: Path) -> Path:
    path = Path(directory) / REPORT_FILE
    path.write_text(json.dumps(report, indent=1) + "\n")
    return path


def format_report(report: dict[str, Any]) -> str:
    """A table: one row per selection, the relative error in each converted block."""
    blocks = report["blocks"]
    names = list(blocks)
    first = blocks[names[0]]
    lines = ["selected  active  " + "  ".join(f"err[{b:>2}] (random router)" for b in names)]
    for r, row in enumerate(first):
        errors = "  ".join(
            f"{blocks[b][r]['rel_error']:7.4f} ({blocks[b][r]['rel_error_random_router']:6.4f})" for b in names
        )
        lines.append(f"{row['selected']:>8}  {row['active_fraction']:6.3f}  {errors}")
    return "\n".join(lines)
