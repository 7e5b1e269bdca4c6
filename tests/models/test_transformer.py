from __future__ import annotations

import pytest
import torch

from sparse_train.config import load_config
from sparse_train.models.transformer import Transformer, count_parameters
from tests.conftest import tiny_config


def _model(*extra: str) -> Transformer:
    cfg = tiny_config("model.vocab_size=50", *extra)
    return Transformer(cfg.model, cfg.moe, cfg.router, cfg.fff)


def test_shapes_and_moe_aux_per_moe_block():
    model = _model("model.n_layers=3", "model.sparse_every_n=2")
    out = model(torch.randint(0, 50, (2, 9)))
    assert out.logits_BSV.shape == (2, 9, 50)
    assert len(out.sparse_aux) == 1 and len(model.sparse_layers) == 1  # only block 1 of 0..2


def test_causality_future_tokens_do_not_change_past_logits():
    model = _model("model.ffn=dense")
    a = torch.randint(0, 50, (1, 10))
    b = a.clone()
    b[0, 6:] = (b[0, 6:] + 1) % 50
    torch.testing.assert_close(model(a).logits_BSV[:, :6], model(b).logits_BSV[:, :6])


def test_moe_causality_holds_in_dropless_mode():
    model = _model()
    a = torch.randint(0, 50, (1, 10))
    b = a.clone()
    b[0, 8:] = (b[0, 8:] + 3) % 50
    torch.testing.assert_close(model(a).logits_BSV[:, :8], model(b).logits_BSV[:, :8])


def test_tied_embeddings_share_storage_and_grouped_query_attention_runs():
    model = _model("model.tie_embeddings=true", "model.n_heads=4", "model.n_kv_heads=2")
    assert model.lm_head.weight is model.embed.weight
    assert model.blocks[0].attn.wk.weight.shape == (16, 32)  # 2 kv heads x head_dim 8
    out = model(torch.randint(0, 50, (2, 5)))
    out.logits_BSV.sum().backward()
    assert model.embed.weight.grad is not None


def test_parameter_counts_total_and_active():
    model = _model()
    counts = count_parameters(model)
    per_expert = 3 * 32 * 32  # gate, up, down of width 32 on d_model 32
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["total"] - counts["active"] == 2 * per_expert * (4 - 2)  # 2 MoE layers, 2 of 4 idle
    dense = count_parameters(_model("model.ffn=dense"))
    assert dense["total"] == dense["active"]


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_matches_a_direct_complex_rotation(interleaved):
    from sparse_train.models.rope import apply_rotary, rotary_tables

    cos, sin = rotary_tables(load_config(None, ["model.d_model=16", "model.n_heads=4"]).model, max_seq_len=3)
    x = torch.randn(1, 1, 3, 4)
    got = apply_rotary(x, cos, sin, interleaved)
    # pairs (i, i + half), or (2i, 2i + 1) interleaved, rotate by angle pos * theta^(-2i/d)
    for pos in range(3):
        for i in range(2):
            a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + 2)
            angle = pos * 10000.0 ** (-2 * i / 4)
            z = complex(x[0, 0, pos, a], x[0, 0, pos, b]) * complex(
                torch.cos(torch.tensor(angle)), torch.sin(torch.tensor(angle))
            )
            assert abs(got[0, 0, pos, a] - z.real) < 1e-5 and abs(got[0, 0, pos, b] - z.imag) < 1e-5
