"""`sparse-train bench fff-repro`: does load balancing + a master leaf improve FFF training?

Seed paper 002 ("Enhancing Fast Feed Forward Networks with Load Balancing and a Master Leaf
Node", arXiv 2405.16836) reports up to +16.3 points train and +3 points test accuracy over
the original FFF, with smaller variance across seeds. This command repeats the comparison on
scikit-learn's bundled digits (8x8 images, 10 classes, 1,797 samples; no download):

  fff              the original recipe: soft training (every leaf, weighted by its path
                   probability) with the hardening loss, evaluated by the hard descent
  fff+lb           + the leaf load-balancing loss (MoE-style L * sum f_i p_i)
  fff+lb+master    + a master leaf blended with the tree by a trained coefficient
  dense            a dense GELU FFN with the training FLOPs of the soft FFF (all leaves and
                   nodes): width (N * d_in + L * l * (d_in + d_out)) / (d_in + d_out)

Each variant is the whole network (64 inputs -> 10 logits, as the FFF papers' MNIST
experiments), trained with AdamW and the same schedule, for several seeds and two depths.
`train_acc`/`test_acc` are measured in evaluation mode, i.e. with the hard descent FFF
inference uses; `*_acc_soft` with the soft mixture the tree was trained as.
The settings below were fixed before the first run and are not tuned to the outcome.
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparse_train.config import FFFConfig
from sparse_train.models.experts import GELU
from sparse_train.models.fff import FFFLayer

VARIANTS = ("fff", "fff+lb", "fff+lb+master", "dense")


@dataclass(frozen=True)
class Recipe:
    leaf_width: int = 8
    epochs: int = 150
    batch_size: int = 64
    lr: float = 1e-2
    weight_decay: float = 0.0
    hardening_coef: float = 0.1
    balance_coef: float = 0.1
    test_fraction: float = 0.2


def load_digits_split(test_fraction: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits scaled to [0, 1], split stratified by class with a fixed seed (the same for every run)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:
        raise RuntimeError("bench fff-repro needs scikit-learn: pip install 'sparse_train[bench]'") from err
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data / 16.0, digits.target, test_size=test_fraction, random_state=0, stratify=digits.target
    )
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.int64)  # noqa: E731
    return as_x(x_train), as_y(y_train), as_x(x_test), as_y(y_test)


def dense_width(depth: int, leaf_width: int, d_in: int, d_out: int) -> int:
    """Hidden width of a dense FFN whose multiply-adds per sample equal the soft FFF's."""
    nodes, leaves = 2**depth - 1, 2**depth
    return round((nodes * d_in + leaves * leaf_width * (d_in + d_out)) / (d_in + d_out))


def build(variant: str, depth: int, recipe: Recipe, d_in: int, d_out: int) -> nn.Module:
    if variant == "dense":
        return GELU(d_in, dense_width(depth, recipe.leaf_width, d_in, d_out), d_out)
    cfg = FFFConfig(
        depth=depth,
        leaf_width=recipe.leaf_width,
        leaf_activation="gelu",
        mode="soft",
        hardening_coef=recipe.hardening_coef,
        balance_coef=recipe.balance_coef if "lb" in variant else 0.0,
        master_leaf=variant.endswith("master"),
        kernel_backend="torch",
        inference_backend="torch",
    )
    return FFFLayer(d_in, cfg, d_out)


def _forward(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
    if isinstance(model, FFFLayer):
        logits, aux = model(x)
        return logits, aux.objective, aux
    return model(x), x.new_zeros(()), None


def train_and_evaluate(variant: str, depth: int, seed: int, recipe: Recipe, data) -> dict[str, float]:
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = build(variant, depth, recipe, x_train.shape[1], 10)
    _init(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = -(-x_train.shape[0] // recipe.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.lr, total_steps=recipe.epochs * steps_per_epoch, pct_start=0.1
    )
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(recipe.epochs):
        for idx in torch.randperm(x_train.shape[0], generator=g).split(recipe.batch_size):
            logits, aux_objective, _ = _forward(model, x_train[idx])
            loss = F.cross_entropy(logits, y_train[idx]) + aux_objective
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    result: dict[str, float] = {}
    with torch.no_grad():
        for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
            model.eval()  # FFF: the hard descent, as deployed
            logits, _, aux = _forward(model, x)
            result[f"{split}_acc"] = float((logits.argmax(-1) == y).float().mean())
            if aux is not None and split == "test":
                result["leaf_entropy"] = float(aux.metrics["leaf_usage_entropy"])
                if "master_blend" in aux.metrics:
                    result["master_blend"] = float(aux.metrics["master_blend"])
            if isinstance(model, FFFLayer):  # and the soft mixture it was trained as
                model.train()
                logits, _, _ = _forward(model, x)
                result[f"{split}_acc_soft"] = float((logits.argmax(-1) == y).float().mean())
    return result


def _init(model: nn.Module) -> None:
    """fastfeedforward's initialisation: uniform(+-1/sqrt(fan_in)); biases and blend logit zero."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("node_bias", "master_logit")):
                p.zero_()
            elif name.endswith("node_weight"):
                p.uniform_(-(p.shape[1] ** -0.5), p.shape[1] ** -0.5)
            elif p.dim() == 3:  # stacked leaves [L, in, out]
                p.uniform_(-(p.shape[1] ** -0.5), p.shape[1] ** -0.5)
            else:  # nn.Linear [out, in]
                p.uniform_(-(p.shape[1] ** -0.5), p.shape[1] ** -0.5)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def run(depths: list[int], seeds: int, *, recipe: Recipe, as_json: bool) -> list[dict[str, Any]]:
    from tqdm import tqdm

    torch.set_num_threads(1)  # tiny models: one thread is fastest and deterministic
    data = load_digits_split(recipe.test_fraction)
    cases = [(d, v, s) for d in depths for v in VARIANTS for s in range(seeds)]
    runs: dict[tuple[int, str], list[dict[str, float]]] = {}
    for depth, variant, seed in tqdm(cases, desc="fff-repro", unit="run", file=sys.stderr):
        runs.setdefault((depth, variant), []).append(train_and_evaluate(variant, depth, seed, recipe, data))
    results = []
    for (depth, variant), per_seed in runs.items():
        row: dict[str, Any] = {
            "depth": depth,
            "variant": variant,
            "seeds": len(per_seed),
            "leaf_width": recipe.leaf_width,
        }
        if variant == "dense":
            row["dense_width"] = dense_width(depth, recipe.leaf_width, data[0].shape[1], 10)
        for key in per_seed[0]:
            mean, std = _mean_std([r[key] for r in per_seed])
            row[f"{key}_mean"], row[f"{key}_std"] = round(mean, 4), round(std, 4)
        row["per_seed"] = per_seed
        results.append(row)
    for row in results:  # the paper's comparison: each FFF variant against the original FFF
        base = next(r for r in results if r["depth"] == row["depth"] and r["variant"] == "fff")
        for split in ("train", "test"):
            row[f"{split}_acc_gain_vs_fff"] = round(row[f"{split}_acc_mean"] - base[f"{split}_acc_mean"], 4)
        print(json.dumps(row), flush=True)
    if not as_json:
        print(format_table(results), file=sys.stderr)
    return results


def format_table(results: list[dict[str, Any]]) -> str:
    lines = ["depth | variant | train acc | test acc | leaf entropy | gain vs fff (train / test)"]
    for r in results:
        entropy = f"{r['leaf_entropy_mean']:.3f} ± {r['leaf_entropy_std']:.3f}" if "leaf_entropy_mean" in r else "-"
        lines.append(
            f"{r['depth']} | {r['variant']} | {r['train_acc_mean']:.4f} ± {r['train_acc_std']:.4f} | "
            f"{r['test_acc_mean']:.4f} ± {r['test_acc_std']:.4f} | {entropy} | "
            f"{r['train_acc_gain_vs_fff']:+.4f} / {r['test_acc_gain_vs_fff']:+.4f}"
        )
    return "\n".join(lines)
