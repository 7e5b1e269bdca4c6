"""Which parameters weight decay applies to, read from the optimizer's parameter groups.

The rule (docs/decisions.md, "What weight decay applies to"; Megatron-Core's default): every
weight matrix is decayed, embeddings, lm_head, MoE router and FFF node neurons included;
normalisation layers and vectors (biases, node biases, the master-leaf blend logit) are not.
Parameters are picked by module and shape here, not by name, so a rename cannot hide a change.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparse_train.models.fff import FFFLayer
from sparse_train.models.moe import MoELayer
from sparse_train.models.transformer import Transformer
from sparse_train.train.optim import build_optimizer
from tests.conftest import tiny_config

WEIGHT_DECAY, LR, NODE_LR_SCALE = 0.1, 1e-3, 4.0


def _model_and_groups(*overrides: str) -> tuple[Transformer, dict[int, tuple[float, float]]]:
    """The model, and each parameter's (weight_decay, lr) as the optimizer's groups give them."""
    cfg = tiny_config("model.vocab_size=64", f"optimizer.weight_decay={WEIGHT_DECAY}", f"optimizer.lr={LR}", *overrides)
    model = Transformer(cfg.model, cfg.moe, cfg.router, cfg.fff)
    optimizer = build_optimizer(model, cfg.optimizer, node_lr_scale=NODE_LR_SCALE)
    seen: dict[int, tuple[float, float]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert id(p) not in seen, "a parameter in two groups"
            seen[id(p)] = (group["weight_decay"], group["lr"])
    assert set(seen) == {id(p) for p in model.parameters()}, "every parameter is optimised, once"
    return model, seen


def _decay(groups: dict[int, tuple[float, float]], params) -> set[float]:
    return {groups[id(p)][0] for p in params}


def _norm_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, nn.RMSNorm) for p in m.parameters()]


def _linear_biases(model: nn.Module) -> list[nn.Parameter]:
    return [m.bias for m in model.modules() if isinstance(m, nn.Linear) and m.bias is not None]


def test_moe_model_decays_matrices_embeddings_lm_head_and_router_but_not_norms_or_biases():
    model, groups = _model_and_groups("model.qkv_bias=true", "moe.num_shared_experts=1", "moe.shared_expert_gate=true")
    moe_layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    assert moe_layers and all(m.shared_gate is not None for m in moe_layers)
    biases, norms = _linear_biases(model), _norm_params(model)
    assert biases and norms
    assert _decay(groups, norms) == {0.0}
    assert _decay(groups, biases) == {0.0}
    assert _decay(groups, [model.embed.weight]) == {WEIGHT_DECAY}
    assert _decay(groups, [model.lm_head.weight]) == {WEIGHT_DECAY}
    assert _decay(groups, [p for m in moe_layers for p in m.router.parameters()]) == {WEIGHT_DECAY}
    assert _decay(groups, [m.shared_gate.weight for m in moe_layers]) == {WEIGHT_DECAY}
    assert _decay(groups, [p for m in moe_layers for p in m.experts.parameters()]) == {WEIGHT_DECAY}
    # nothing else is exempt: every parameter of 2+ dimensions outside the norms is decayed
    exempt = {id(p) for p in [*biases, *norms]}
    others = [p for p in model.parameters() if id(p) not in exempt]
    assert all(p.dim() >= 2 for p in others) and _decay(groups, others) == {WEIGHT_DECAY}
    assert {lr for _, lr in groups.values()} == {LR}  # no node groups without FFF layers


def test_tied_embedding_is_one_decayed_parameter():
    model, groups = _model_and_groups("model.tie_embeddings=true")
    assert model.lm_head.weight is model.embed.weight
    assert groups[id(model.embed.weight)] == (WEIGHT_DECAY, LR)


@pytest.mark.parametrize("master_leaf", [False, True])
def test_fff_node_weights_decay_like_a_router_at_the_node_learning_rate(master_leaf: bool):
    fff = ("model.ffn=fff", "fff.depth=2", "fff.leaf_width=8", f"fff.master_leaf={str(master_leaf).lower()}")
    model, groups = _model_and_groups(*fff)
    layers = [m for m in model.modules() if isinstance(m, FFFLayer)]
    assert layers
    node_lr = LR * NODE_LR_SCALE
    for layer in layers:
        nodes = layer.node_parameters()
        node_matrices = [p for p in nodes if p.dim() == 2]
        node_vectors = [p for p in nodes if p.dim() < 2]
        assert node_matrices and node_vectors  # the node weights [N, D] and biases [N]
        assert {groups[id(p)] for p in node_matrices} == {(WEIGHT_DECAY, node_lr)}
        assert {groups[id(p)] for p in node_vectors} == {(0.0, node_lr)}
        leaves = layer.leaf_parameters()
        assert {groups[id(p)] for p in leaves if p.dim() >= 2} == {(WEIGHT_DECAY, LR)}
        # the master-leaf blend logit is a [1] vector: decay would pull the blend towards 0.5
        assert {groups[id(p)] for p in leaves if p.dim() < 2} == ({(0.0, LR)} if master_leaf else set())
    assert _decay(groups, _norm_params(model)) == {0.0}


def test_zero_weight_decay_decays_nothing():
    _, groups = _model_and_groups("optimizer.weight_decay=0")
    assert {wd for wd, _ in groups.values()} == {0.0}


def test_decay_is_applied_to_matrices_and_not_to_norm_scales_in_a_step():
    # The groups' settings take effect: with a zero gradient, AdamW's step is the decay alone,
    # w <- (1 - lr * wd) w. A large lr * wd (0.05) keeps the shrink far above rounding.
    cfg = tiny_config("model.vocab_size=64", "optimizer.weight_decay=0.5", "optimizer.lr=0.1")
    model = Transformer(cfg.model, cfg.moe, cfg.router, cfg.fff)
    optimizer = build_optimizer(model, cfg.optimizer)
    norm = _norm_params(model)[0]
    with torch.no_grad():
        norm.normal_()  # not the initial ones, so a shrink would show
    embed, scale = model.embed.weight.detach().clone(), norm.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    torch.testing.assert_close(model.embed.weight.detach(), embed * (1 - 0.1 * 0.5))
    torch.testing.assert_close(norm.detach(), scale)


def test_gpt_oss_parts_stacked_expert_biases_sinks_and_qk_norms_are_not_decayed():
    model, groups = _model_and_groups(
        "moe.expert_bias=true", "router.bias=true", "model.attention.sinks=true", "model.attention.qk_norm=full"
    )
    experts = [m.experts for m in model.modules() if isinstance(m, MoELayer)]
    stacked = [p for e in experts for p in (e.b_gate_up, e.b_down)]
    assert stacked and all(p.dim() >= 2 for p in stacked), "the case the shape rule alone would decay"
    assert _decay(groups, stacked) == {0.0}
    assert _decay(groups, [b.attn.sinks for b in model.blocks]) == {0.0}
    assert _decay(groups, [b.attn.q_norm.weight for b in model.blocks]) == {0.0}
    assert _decay(groups, [e.w_gate_up for e in experts]) == {WEIGHT_DECAY}
