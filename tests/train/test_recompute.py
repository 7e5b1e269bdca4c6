"""Activation checkpointing (train.activation_checkpointing) changes what a step keeps, not what
it computes: the same losses, metrics, parameters and aux-loss-free expert biases as without it,
for every choice of blocks, and a random router routes the same tokens in the recomputation."""

from __future__ import annotations

import pytest
import torch

from sparse_train.models.sparse import SparseFFN
from sparse_train.train.recompute import checkpoint_blocks
from sparse_train.train.trainer import Trainer
from tests.conftest import tiny_config

COMMON = (
    "train.steps=2",
    "checkpoint.every=0",
    "checkpoint.save_final=false",
    "train.eval_every=0",
    "model.sparse_every_n=2",  # dense and sparse blocks, so "sparse" and "dense" differ
    "router.bias_update_rate=0.01",  # a forward side effect: the step's selection counts
    "train.grad_accum=2",
)


def _run(tmp_path, mode: str, *extra: str):
    trainer = Trainer(tiny_config(*COMMON, f"train.activation_checkpointing={mode}", *extra), tmp_path / mode)
    records = [trainer.train_step() for _ in range(2)]
    return trainer, records


@pytest.mark.parametrize("mode", ["all", "sparse", "dense"])
def test_recomputed_blocks_train_exactly_as_kept_ones(tmp_path, mode):
    base, base_records = _run(tmp_path, "none")
    other, records = _run(tmp_path, mode)
    for a, b in zip(base_records, records, strict=True):
        assert a["lm_loss"] == b["lm_loss"]
        assert a.get("expert_load") == b.get("expert_load")
    for (name, pa), pb in zip(base.model.named_parameters(), other.model.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=name)
    biases = [(n, b) for n, b in base.model.named_buffers() if "expert_bias" in n]
    assert biases and any(b.abs().sum() > 0 for _, b in biases)  # the counts moved them
    for (name, ba), bb in zip(biases, [b for n, b in other.model.named_buffers() if "expert_bias" in n], strict=True):
        torch.testing.assert_close(ba, bb, rtol=0, atol=0, msg=name)


def test_a_random_router_routes_the_same_tokens_when_recomputed(tmp_path):
    base, base_records = _run(tmp_path, "none", "router.type=random", "router.bias_update_rate=0")
    other, records = _run(tmp_path, "all", "router.type=random", "router.bias_update_rate=0")
    assert [r["lm_loss"] for r in base_records] == [r["lm_loss"] for r in records]
    for pa, pb in zip(base.model.parameters(), other.model.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def _model(mode: str):
    from sparse_train.models.transformer import Transformer

    cfg = tiny_config(*COMMON, "model.vocab_size=64")
    model = Transformer(cfg.model, cfg.moe, cfg.router, cfg.fff)
    return model, checkpoint_blocks(model, mode), cfg


def test_the_mode_picks_the_blocks_by_their_ffn():
    from sparse_train.models.transformer import Block

    counts = {mode: _model(mode)[1] for mode in ("none", "all", "sparse", "dense")}
    blocks = [m for m in _model("none")[0].modules() if isinstance(m, Block)]
    sparse = sum(isinstance(b.ffn, SparseFFN) for b in blocks)
    assert 0 < sparse < len(blocks)
    assert counts == {"none": 0, "all": len(blocks), "sparse": sparse, "dense": len(blocks) - sparse}


def test_the_recomputation_does_not_count_the_selections_again():
    from sparse_train.models.moe import MoELayer

    model, _, cfg = _model("all")
    tokens = torch.randint(0, 64, (2, 16))
    model(tokens).logits_BSV.float().pow(2).mean().backward()
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    assert layers
    for layer in layers:  # one forward's selections: every token's top_k, once
        assert layer.take_bias_counts().sum().item() == tokens.numel() * cfg.router.top_k


@pytest.mark.parametrize("mode, runs_per_block", [("none", 1), ("all", 2)])
def test_the_trainer_recomputes_the_blocks_it_is_told_to(tmp_path, monkeypatch, mode, runs_per_block):
    from sparse_train.models.transformer import Block

    calls = []
    forward = Block.forward
    monkeypatch.setattr(Block, "forward", lambda self, *a, **k: calls.append(self) or forward(self, *a, **k))
    trainer = Trainer(tiny_config(*COMMON, f"train.activation_checkpointing={mode}"), tmp_path)
    calls.clear()
    trainer.train_step()
    blocks = [m for m in trainer.model.modules() if isinstance(m, Block)]
    assert len(calls) == runs_per_block * len(blocks) * 2  # two micro-batches
