"""FFF layer: tree probabilities, the three training modes against plain-autograd references
(outputs and every gradient), losses, the master leaf, and the hard inference paths."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sparse_train.config import FFFConfig
from sparse_train.models.fff import (
    FFFLayer,
    decision_entropy,
    descend,
    fff_hard_forward,
    fff_reference_forward,
    leaf_log_probs,
)

D = 12


def _layer(seed: int = 0, d_out: int | None = None, **cfg) -> FFFLayer:
    torch.manual_seed(seed)
    layer = FFFLayer(D, FFFConfig(**{"depth": 3, "leaf_width": 6, "kernel_backend": "torch", **cfg}), d_out)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.4)
    return layer


def _path_probs_by_loop(logits_TN: torch.Tensor, depth: int) -> torch.Tensor:
    """Each leaf's probability as the product along its path, read from the leaf index's bits."""
    T, L = logits_TN.shape[0], 2**depth
    out = torch.ones(T, L, dtype=torch.float64)
    for leaf in range(L):
        node = 0
        for level in range(depth):
            right = (leaf >> (depth - 1 - level)) & 1
            p_right = torch.sigmoid(logits_TN[:, node].double())
            out[:, leaf] *= p_right if right else 1 - p_right
            node = 2 * node + 1 + right
    return out


def test_leaf_probabilities_are_path_products_and_sum_to_one():
    logits = torch.randn(9, 15) * 3
    probs = leaf_log_probs(logits, 4).exp()
    torch.testing.assert_close(probs.double(), _path_probs_by_loop(logits, 4), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(probs.sum(-1), torch.ones(9))


def test_descent_goes_right_on_non_negative_logits():
    logits = torch.tensor([[1.0, -1.0, 0.0], [-2.0, 0.0, 5.0], [0.0, 3.0, -0.5]])
    # token 0: root right (node 2), node 2 has logit 0 -> right: leaf 3. token 1: left (node 1), 0 -> right: leaf 1.
    # token 2: right (node 2), -0.5 -> left: leaf 2
    assert descend(logits, 2).tolist() == [3, 1, 2]


def test_hard_descent_picks_the_most_probable_path_when_decisions_are_sharp():
    raw = torch.randn(64, 31)
    logits = raw.sign() * (5 + raw.abs())  # every |logit| >= 5: the greedy path has probability > 0.96
    assert torch.equal(descend(logits, 5), leaf_log_probs(logits, 5).argmax(-1))


def _reference(layer: FFFLayer, x_TD: torch.Tensor, mode: str) -> torch.Tensor:
    """The layer's output with plain autograd: every leaf on every token, weighted per mode."""
    logits = F.linear(x_TD, layer.tree.node_weight, layer.tree.node_bias)
    probs = _path_probs_by_loop(logits, layer.depth).float()  # differentiable through sigmoid
    outs = torch.stack([layer.experts.expert_forward(e, x_TD) for e in range(layer.num_experts)], dim=1)
    if mode == "soft":
        weights = probs
    elif mode == "topk_paths":
        top = probs.topk(layer.cfg.top_k, dim=-1)
        weights = torch.zeros_like(probs).scatter(1, top.indices, top.values / top.values.sum(-1, keepdim=True))
    else:
        leaf = descend(logits.detach(), layer.depth)
        p = probs.gather(1, leaf[:, None])
        weights = torch.zeros_like(probs).scatter(1, leaf[:, None], p - p.detach() + 1)  # value 1, gradient of p
    y = (weights[..., None] * outs).sum(1)
    if layer.master is not None:
        a = torch.sigmoid(layer.master_logit)
        y = (1 - a) * y + a * layer.master(x_TD)
    return y


CASES = {
    f"{mode}-{act}{'-master' if master else ''}": dict(mode=mode, leaf_activation=act, master_leaf=master)
    for mode in ("soft", "topk_paths", "hard")
    for act in ("swiglu", "gelu")
    for master in (False, True)
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_every_gradient_match_the_plain_autograd_reference(case):
    layer = _layer(**CASES[case], top_k=3)
    x = torch.randn(2, 7, D, requires_grad=True)
    dy = torch.randn(2, 7, D)
    y, _ = layer(x)
    fast = torch.autograd.grad(y, [x, *layer.parameters()], dy)
    y_ref = _reference(layer, x.reshape(-1, D), layer.cfg.mode).reshape(2, 7, D)
    ref = torch.autograd.grad(y_ref, [x, *layer.parameters()], dy, allow_unused=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    names = ["x", *(n for n, _ in layer.named_parameters())]
    for name, g_fast, g_ref in zip(names, fast, ref, strict=True):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    node_grad = fast[names.index("tree.node_weight")]
    assert node_grad.abs().sum() > 0, "the nodes learn in every mode (straight-through in hard)"


def test_classifier_shaped_fff_maps_to_another_width():
    layer = _layer(d_out=5, leaf_activation="gelu", master_leaf=True, mode="soft")
    x = torch.randn(11, D)
    y, _ = layer(x)
    assert y.shape == (11, 5)
    torch.testing.assert_close(y, _reference(layer, x, "soft"), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="SwiGLU leaves map d_model to d_model"):
        FFFLayer(D, FFFConfig(leaf_activation="swiglu"), d_out=5)


def test_losses_and_metrics():
    layer = _layer(mode="soft", master_leaf=True, balance_coef=0.5, hardening_coef=0.25)
    x = torch.randn(40, D)
    _, aux = layer(x)
    logits = F.linear(x, layer.tree.node_weight, layer.tree.node_bias)
    p = torch.sigmoid(logits)
    # hardening: the original FFF's per-node Bernoulli entropy, averaged over tokens and nodes
    torch.testing.assert_close(aux.hardening_loss, (-(p * p.log()) - (1 - p) * (1 - p).log()).mean())
    # balancing: L * sum_i f_i p_i with f_i over the descent's leaves
    leaf = descend(logits, 3)
    f = torch.bincount(leaf, minlength=8).float() / 40
    probs = _path_probs_by_loop(logits, 3).float()
    torch.testing.assert_close(aux.lb_loss, 8 * (f * probs.mean(0)).sum())
    torch.testing.assert_close(aux.load, f)
    torch.testing.assert_close(aux.objective, 0.5 * aux.lb_loss + 0.25 * aux.hardening_loss)
    sharp = ((p < 0.05) | (p > 0.95)).float().mean()
    torch.testing.assert_close(aux.metrics["sharpness"], sharp)
    torch.testing.assert_close(aux.metrics["leaf_usage_entropy"], -(f[f > 0] * f[f > 0].log()).sum())
    assert float(aux.metrics["master_blend"]) == pytest.approx(float(torch.sigmoid(layer.master_logit.detach())))


def test_decision_entropy_is_stable_at_extreme_logits():
    h = decision_entropy(torch.tensor([-1e4, -30.0, 0.0, 30.0, 1e4]))
    assert torch.isfinite(h).all()
    assert float(h[2]) == pytest.approx(math.log(2))
    assert float(h[0]) < 1e-10 and float(h[-1]) < 1e-10


def test_topk_paths_balance_counts_every_chosen_leaf():
    layer = _layer(mode="topk_paths", top_k=2)
    _, aux = layer(torch.randn(30, D))
    assert float(aux.load.sum()) == pytest.approx(1.0)
    assert int((aux.load > 0).sum()) >= 2


def test_node_and_leaf_parameter_groups_partition_the_layer():
    layer = _layer(master_leaf=True)
    nodes, leaves = layer.node_parameters(), layer.leaf_parameters()
    assert {id(p) for p in nodes} == {id(layer.tree.node_weight), id(layer.tree.node_bias)}
    assert {id(p) for p in nodes} | {id(p) for p in leaves} == {id(p) for p in layer.parameters()}
    assert not {id(p) for p in nodes} & {id(p) for p in leaves}


# ---- inference ---------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ["swiglu", "gelu"])
@pytest.mark.parametrize("trained_mode", ["soft", "hard"])
def test_torch_inference_is_bit_for_bit_the_hard_training_path(act, trained_mode):
    layer = _layer(mode="hard", leaf_activation=act, master_leaf=True, inference_backend="torch")
    x = torch.randn(3, 50, D)
    with torch.no_grad():
        y_train, _ = layer(x)  # training mode, hard: the straight-through path
        layer.cfg.mode = trained_mode  # evaluation descends hard whatever the training mode
        layer.eval()
        y_eval, aux = layer(x)
    assert torch.equal(y_eval, y_train)
    torch.testing.assert_close(y_eval.reshape(-1, D), fff_reference_forward(layer, x.reshape(-1, D)))
    assert float(aux.load.sum()) == pytest.approx(1.0)


@pytest.mark.slow  # builds the C++ extension (~40 s) unless this machine's cache has it
@pytest.mark.parametrize("act", ["swiglu", "gelu"])
@pytest.mark.parametrize(
    ("depth", "width"),
    [(1, 64), (4, 6), (3, 17), (4, 128)],
    ids=[
        "crowded-wide-leaves-blas",
        "blocks-and-few-token-streams",
        "width-not-a-multiple-of-16",
        "wide-rows-streamed",
    ],
)
def test_cpp_inference_takes_the_same_leaves_and_matches_the_torch_path(act, depth, width):
    layer = _layer(
        depth=depth, leaf_width=width, leaf_activation=act, master_leaf=act == "gelu", inference_backend="cpp"
    )
    layer.eval()
    x = torch.randn(257, D)
    with torch.no_grad():
        y_cpp, leaf_cpp, counts_cpp = fff_hard_forward(x, layer.tree, layer.experts, backend="cpp")
        y_torch, leaf_torch, counts_torch = fff_hard_forward(x, layer.tree, layer.experts, backend="torch")
        logits = layer.tree(x)
        assert logits.abs().min() > 1e-4, "no near-tie in the test data: both paths must agree exactly on leaves"
        assert torch.equal(leaf_cpp, leaf_torch) and torch.equal(counts_cpp, counts_torch)
        atol = 1e-6 * width**0.5  # fp32 sums over the leaf width, in another order
        torch.testing.assert_close(y_cpp, y_torch, rtol=1e-5, atol=atol)
        y_layer, _ = layer(x)  # the layer's evaluation path (cpp backend, master leaf blended)
        torch.testing.assert_close(y_layer, fff_reference_forward(layer, x), rtol=1e-5, atol=atol)


def test_cpp_inference_rejects_what_it_cannot_run():
    layer = _layer().double()
    with pytest.raises(ValueError, match="'cpp' does not apply: it computes in fp32"):
        fff_hard_forward(torch.randn(4, D, dtype=torch.float64), layer.tree, layer.experts, backend="cpp")
    y, _, _ = fff_hard_forward(torch.randn(4, D, dtype=torch.float64), layer.tree, layer.experts, backend="auto")
    assert y.dtype == torch.float64  # auto falls back to torch


def test_evaluation_with_gradients_enabled_uses_the_differentiable_path():
    layer = _layer(mode="soft")
    layer.eval()
    x = torch.randn(5, D, requires_grad=True)
    y, _ = layer(x)
    y.sum().backward()
    assert x.grad is not None and layer.tree.node_weight.grad is not None
