"""Every recipe in configs/ loads, and the full-size ones have their published parameter counts.

The full-size models are built on the meta device (no memory). Their shapes are those of the
published HF config.json files; transformers' own models built from those configs have exactly
the totals measured here (DeepSeek-V3 without its MTP module, which transformers does not build),
so a miss below is a difference of counting convention or of rounding, not of shape.

Counting conventions. `count_parameters` counts as active every parameter except the routed
experts a token does not use: the embedding and the output projection are both active. The
publishers differ:
- OLMoE and Qwen3 count both (OLMoE without the embedding would be 1.18B, not 1.3B);
- gpt-oss's model card counts the unembedding but not the embedding (a lookup, no FLOPs):
  5.13B = 5.71B - the 0.58B embedding;
- DeepSeek-V3 does not say; its "37B" is what the count without the embedding (36.6B) rounds
  to, not the one with it (37.6B), so it is compared without the embedding too.
The published totals and DeepSeek-V3's active count exclude the multi-token-prediction module
(parameters named `mtp.`; 11.6B here, plus the embedding and output head it shares: the 14B
DeepSeek states). Total counts never depend on the convention. Totals are checked to 1%; active counts, which are
published to two or three significant digits, by rounding to the published figure (DeepSeek-V3's
36.63B and OLMoE's 1.282B are 1.0% and 1.4% below the rounded figures they round to).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from sparse_train.config import load_config
from sparse_train.models.transformer import Transformer, count_parameters

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass(frozen=True)
class Published:
    total: float
    active: float
    digits: int  # significant digits the active count is published with (its rounding)
    embedding_active: bool  # whether the publisher counts the input embedding as active


PUBLISHED = {
    "deepseek-v3-671b": Published(total=671e9, active=37e9, digits=2, embedding_active=False),
    "qwen3-235b-a22b": Published(total=235e9, active=22e9, digits=2, embedding_active=True),
    "olmoe-1b-7b": Published(total=6.9e9, active=1.3e9, digits=2, embedding_active=True),
    "gpt-oss-120b": Published(total=116.83e9, active=5.13e9, digits=3, embedding_active=False),
    "mixtral-8x22b": Published(total=141e9, active=39e9, digits=2, embedding_active=True),
}


def _recipes() -> list[Path]:
    return sorted(CONFIGS.glob("*.yaml"))


def _counts(name: str) -> tuple[int, int, int]:
    """(total, active, embedding) of a full-size recipe without its MTP modules, on meta."""
    cfg = load_config(CONFIGS / f"{name}.yaml")
    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.moe, cfg.router, cfg.fff)
    total = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    if cfg.model.mtp_depth:
        # count_parameters counts the MTP modules' experts too: count the same model without them
        main = load_config(CONFIGS / f"{name}.yaml", ["model.mtp_depth=0"])
        with torch.device("meta"):
            model = Transformer(main.model, main.moe, main.router, main.fff)
    counts = count_parameters(model)
    assert counts["total"] == total, "the model without MTP modules is not the main model"
    return total, counts["active"], model.embed.weight.numel()


def _rel(measured: float, published: float) -> float:
    return (measured - published) / published


@pytest.mark.parametrize("path", _recipes(), ids=lambda p: p.stem)
def test_every_recipe_loads(path: Path) -> None:
    load_config(path)


def test_every_full_size_recipe_exists() -> None:
    assert set(PUBLISHED) <= {p.stem for p in _recipes()}


@pytest.mark.parametrize("name", PUBLISHED)
def test_total_parameters_match_the_published_count(name: str) -> None:
    total, _, _ = _counts(name)
    assert abs(_rel(total, PUBLISHED[name].total)) <= 0.01, f"{total:,} vs {PUBLISHED[name].total:,.0f}"


def _active(name: str) -> float:
    _, active, embedding = _counts(name)
    return active if PUBLISHED[name].embedding_active else active - embedding


@pytest.mark.parametrize("name", PUBLISHED)
def test_active_counts_round_to_the_published_figure(name: str) -> None:
    p = PUBLISHED[name]
    active = _active(name)
    assert float(f"{active:.{p.digits}g}") == p.active, f"{active:,} does not round to {p.active:,.0f}"
