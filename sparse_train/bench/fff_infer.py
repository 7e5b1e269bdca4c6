"""`sparse-train bench fff-infer`: hard FFF inference against a dense FFN of the same total width.

For every (depth, batch), one JSON object. Times are forward-only (no gradient), medians over
interleaved rounds after warm-up of the mean time per call, each round at least 20 ms of
back-to-back calls (bench.measure; a batch-1 call takes microseconds):

  fff_ms                  our FFF layer in evaluation (the fused C++ descent where it builds)
  fff_torch_ms            the same with the torch inference backend
  dense_ms                gelu(x @ W_in) @ W_out with W_in [d, 2^depth * leaf_width]: the dense FFN
                          the tree's leaves would form side by side
  speedup_vs_dense        dense_ms / fff_ms
  theoretical_flop_ratio  dense multiply-adds / the FFF's (depth node dots + one leaf): 2dW / (depth*d + 2*d*l)
  fastfeedforward_ms      the `fastfeedforward` package's FFF.eval_forward on identical weights (zero
                          biases, GELU), when installed; speedup_vs_fastfeedforward = its ms / fff_ms
  leaf_mismatches         tokens the fused kernel sends to another leaf than the torch path
                          (only fp32 near-ties of a node logit: see max_abs_logit_where_leaves_differ)
  max_abs_diff_vs_*       output difference against the torch backend (same-leaf tokens) and
                          against fastfeedforward

GELU leaves without biases (the dense FFN has none either). A peer that cannot run gets null
and an `<peer>_error` string.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
from torch import nn

from sparse_train.bench.measure import interleaved_median_ms
from sparse_train.config import FFFConfig
from sparse_train.models import fff
from sparse_train.models.experts import GELU
from sparse_train.models.fff import FFFLayer

D_MODEL = 512
TOTAL_WIDTH = 4096
DEPTHS = (4, 6, 8, 10)
BATCHES = (1, 64, 4096)


def build(depth: int, seed: int) -> tuple[FFFLayer, GELU]:
    """An FFF with leaves of width TOTAL_WIDTH / 2^depth and random weights, and a dense GELU FFN
    of width TOTAL_WIDTH (weights at the same scale)."""
    torch.manual_seed(seed)
    leaf_width = TOTAL_WIDTH // 2**depth
    layer = FFFLayer(D_MODEL, FFFConfig(depth=depth, leaf_width=leaf_width, leaf_activation="gelu"))
    dense = GELU(D_MODEL, TOTAL_WIDTH)
    with torch.no_grad():
        layer.tree.node_weight.normal_(0, D_MODEL**-0.5)
        layer.tree.node_bias.normal_(0, 0.1)
        layer.experts.w_in.normal_(0, D_MODEL**-0.5)
        layer.experts.w_out.normal_(0, leaf_width**-0.5)
        dense.w_in.weight.normal_(0, D_MODEL**-0.5)
        dense.w_out.weight.normal_(0, TOTAL_WIDTH**-0.5)
    return layer.eval(), dense.eval()


def fastfeedforward_peer(layer: FFFLayer) -> nn.Module:
    """The reference library's FFF with our weights (its biases zero, GELU activation)."""
    from fastfeedforward import FFF

    peer = FFF(D_MODEL, layer.cfg.leaf_width, D_MODEL, layer.depth, activation=nn.GELU())
    with torch.no_grad():
        peer.node_weights.copy_(layer.tree.node_weight)
        peer.node_biases.copy_(layer.tree.node_bias[:, None])
        peer.w1s.copy_(layer.experts.w_in)
        peer.w2s.copy_(layer.experts.w_out)
        peer.b1s.zero_()
        peer.b2s.zero_()
    return peer.eval()


def compare_backends(layer: FFFLayer, x: torch.Tensor) -> dict[str, Any]:
    """The fused kernel against the torch path (the training path's arithmetic): tokens sent to
    another leaf (only where a node's logit is within fp32 rounding of zero, so the two
    summation orders disagree on its sign), and the output difference over the others."""
    y_fast, leaf_fast, _ = fff.fff_hard_forward(x, layer.tree, layer.experts, backend="auto")
    y_ref, leaf_ref, _ = fff.fff_hard_forward(x, layer.tree, layer.experts, backend="torch")
    same = leaf_fast == leaf_ref
    result: dict[str, Any] = {"leaf_mismatches": int((~same).sum())}
    if not bool(same.all()):
        logits = layer.tree(x[~same])  # the smallest |logit| on the mismatched tokens' paths
        result["max_abs_logit_where_leaves_differ"] = float(_path_min_abs_logit(logits, layer.depth).max())
    result["max_abs_diff_vs_torch_backend"] = float((y_fast[same] - y_ref[same]).abs().max()) if same.any() else 0.0
    return result


def _path_min_abs_logit(logits_TN: torch.Tensor, depth: int) -> torch.Tensor:
    node = torch.zeros(logits_TN.shape[0], dtype=torch.int64)
    smallest = torch.full((logits_TN.shape[0],), float("inf"))
    for _ in range(depth):
        c = logits_TN.gather(1, node[:, None])[:, 0]
        smallest = torch.minimum(smallest, c.abs())
        node = 2 * node + 1 + (c >= 0).long()
    return smallest


def theoretical_flop_ratio(depth: int) -> float:
    leaf_width = TOTAL_WIDTH // 2**depth
    return 2 * D_MODEL * TOTAL_WIDTH / (depth * D_MODEL + 2 * D_MODEL * leaf_width)


def bench_case(depth: int, batch: int, *, repeats: int, warmup: int, seed: int, peers: set[str]) -> dict[str, Any]:
    layer, dense = build(depth, seed)
    x = torch.randn(batch, D_MODEL, generator=torch.Generator().manual_seed(seed + 1))
    result: dict[str, Any] = {
        "depth": depth,
        "batch": batch,
        "d_model": D_MODEL,
        "leaf_width": layer.cfg.leaf_width,
        "total_width": TOTAL_WIDTH,
    }

    def ours(backend: str):
        def run() -> torch.Tensor:
            layer.cfg.inference_backend = backend
            return layer(x)[0]

        return run

    candidates = {"fff": ours("auto"), "fff_torch": ours("torch"), "dense": lambda: dense(x)}
    with torch.no_grad():
        reference = ours("torch")()
        result.update(compare_backends(layer, x))
        if "fastfeedforward" in peers:
            try:
                peer = fastfeedforward_peer(layer)
                result["max_abs_diff_vs_fastfeedforward"] = float((peer(x) - reference).abs().max())
                candidates["fastfeedforward"] = lambda: peer(x)
            except ImportError:
                result["fastfeedforward_ms"] = None
                result["fastfeedforward_error"] = "not installed: pip install 'sparse_train[bench]'"
            except Exception as err:  # noqa: BLE001 - a peer that cannot run is a result
                result["fastfeedforward_ms"] = None
                result["fastfeedforward_error"] = f"{type(err).__name__}: {err}"[:300]
        # the slow per-sample peer: fewer rounds at large batches, where one call takes seconds
        slow_repeats = repeats if batch < 1024 else max(1, min(repeats, 3))
        fast = {k: v for k, v in candidates.items() if k != "fastfeedforward"}
        times = interleaved_median_ms(fast, repeats=repeats, warmup=warmup, device=x.device, min_round_ms=20)
        if "fastfeedforward" in candidates:
            times.update(
                interleaved_median_ms(
                    {"fastfeedforward": candidates["fastfeedforward"]}, repeats=slow_repeats, warmup=1, device=x.device
                )
            )
    for name, ms in times.items():
        result[f"{name}_ms"] = round(ms, 4)
    result["speedup_vs_dense"] = round(times["dense"] / times["fff"], 3)
    result["speedup_torch_vs_dense"] = round(times["dense"] / times["fff_torch"], 3)
    result["theoretical_flop_ratio"] = round(theoretical_flop_ratio(depth), 1)
    if "fastfeedforward" in times:
        result["speedup_vs_fastfeedforward"] = round(times["fastfeedforward"] / times["fff"], 2)
    result["threads"] = torch.get_num_threads()
    return result


def run(
    depths: list[int], batches: list[int], *, repeats: int, warmup: int, seed: int, peers: set[str], as_json: bool
) -> list[dict[str, Any]]:
    from tqdm import tqdm

    results = []
    cases = [(d, b) for d in depths for b in batches]
    for depth, batch in tqdm(cases, desc="fff-infer", unit="case", file=sys.stderr, disable=as_json):
        result = bench_case(depth, batch, repeats=repeats, warmup=warmup, seed=seed, peers=peers)
        results.append(result)
        print(json.dumps(result), flush=True)
    if not as_json:
        cols = [
            "depth",
            "batch",
            "fff_ms",
            "fff_torch_ms",
            "dense_ms",
            "speedup_vs_dense",
            "theoretical_flop_ratio",
            "fastfeedforward_ms",
            "speedup_vs_fastfeedforward",
        ]
        lines = [" | ".join(cols)] + [" | ".join(str(r.get(c)) for c in cols) for r in results]
        print("\n".join(lines), file=sys.stderr)
    return results
