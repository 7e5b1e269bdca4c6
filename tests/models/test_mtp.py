"""Multi-token prediction modules (DeepSeek-V3): what each module sees and predicts, its loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparse_train.config import ConfigError
from sparse_train.models.transformer import Transformer
from sparse_train.train.loss import total_loss
from tests.conftest import tiny_config


def _model(*overrides: str) -> Transformer:
    cfg = tiny_config("model.mtp_depth=2", "model.vocab_size=64", *overrides)
    torch.manual_seed(0)
    return Transformer(cfg.model, cfg.moe, cfg.router, cfg.fff).eval()


def test_module_k_sees_tokens_up_to_k_places_on_and_not_beyond():
    model = _model()
    tokens = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[0, 6] = (tokens[0, 6] + 1) % 64
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert torch.equal(a.logits_BSV[:, :6], b.logits_BSV[:, :6])
    assert not torch.equal(a.logits_BSV[:, 6], b.logits_BSV[:, 6])
    for k, (x, y) in enumerate(zip(a.mtp_logits, b.mtp_logits, strict=True), start=1):
        assert x.shape == (1, 12 - k, 64)
        # position i of module k reads tokens up to i + k: the change at 6 reaches positions 6 - k on
        assert torch.equal(x[:, : 6 - k], y[:, : 6 - k]), f"module {k} saw a later token"
        assert not torch.equal(x[:, 6 - k], y[:, 6 - k]), f"module {k} missed the token {k} places on"


def test_mtp_loss_is_the_weighted_mean_cross_entropy_of_the_shifted_targets():
    model = _model("model.mtp_loss_coef=0.3", "model.ffn=dense")
    tokens = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(2))
    output = model(tokens)
    parts = total_loss(output, targets, ("aux_loss", "z_loss"), mtp_coef=0.3)
    by_module = [F.cross_entropy(output.mtp_logits[k - 1].flatten(0, 1), targets[:, k:].flatten()) for k in (1, 2)]
    want = (by_module[0] + by_module[1]) / 2
    assert torch.allclose(parts.aux["mtp_loss"], want)
    assert torch.allclose(parts.loss, parts.lm_loss + 0.3 * want)


def test_each_module_has_a_block_like_the_last_and_its_sparse_layer_is_counted():
    model = _model("model.sparse_layers=[1]", "model.n_layers=2")
    assert type(model.mtp[0].block.ffn).__name__ == "MoELayer"
    assert len(model.sparse_layers) == 1 + 2
    assert any(name.startswith("mtp.1.block.ffn.experts") for name in model.state_dict())


def test_mtp_refuses_layouts_and_lengths_it_cannot_serve():
    with pytest.raises(ConfigError, match="model.mtp_depth: multi-token prediction under pipeline"):
        tiny_config("model.mtp_depth=1", "parallel.pp=2")
    with pytest.raises(ConfigError, match="model.mtp_depth: must be < data.seq_len"):
        tiny_config("model.mtp_depth=8", "data.seq_len=8")
