from __future__ import annotations

import math

import pytest
import torch

from sparse_train.config import RouterConfig
from sparse_train.models.losses import load_balancing_loss, router_entropy, router_z_loss
from sparse_train.models.routers import Routing, RoutingStats, TopKRouter, apply_capacity, expert_capacity


def _router(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[TopKRouter, Routing]:
    """A router whose logits equal `logits` exactly: identity input, weight = logits^T."""
    T, E = logits.shape
    router = TopKRouter(d_model=T, num_experts=E, cfg=RouterConfig(top_k=top_k, renormalize=renormalize))
    with torch.no_grad():
        router.weight.copy_(logits.t())
    return router, router(torch.eye(T))


def test_topk_softmax_hand_computed():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.5, 0.0, 3.0, 0.0]])
    _, r = _router(logits, top_k=2, renormalize=False)
    probs = torch.softmax(logits, dim=-1)
    assert torch.equal(r.experts_Tk, torch.tensor([[0, 1], [2, 0]]))
    torch.testing.assert_close(r.weights_Tk, torch.stack([probs[0, [0, 1]], probs[1, [2, 0]]]))
    torch.testing.assert_close(r.stats.probs_TE.sum(-1), torch.ones(2))


def test_renormalised_weights_sum_to_one_for_any_k():
    logits = torch.randn(7, 6)
    for k in (1, 2, 3, 6):
        _, r = _router(logits, top_k=k, renormalize=True)
        torch.testing.assert_close(r.weights_Tk.sum(-1), torch.ones(7))
        p = torch.softmax(logits, -1)
        ratio = p[0, r.experts_Tk[0, 0]] / p[0, r.experts_Tk[0, -1]]
        torch.testing.assert_close(r.weights_Tk[0, 0] / r.weights_Tk[0, -1], ratio)  # ratios preserved


def test_router_is_fp32_under_bf16_autocast():
    router = TopKRouter(8, 4, RouterConfig(top_k=2))
    torch.nn.init.normal_(router.weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = router(torch.randn(5, 8))
    assert r.stats.logits_TE.dtype == torch.float32 and r.weights_Tk.dtype == torch.float32


def test_router_rejects_bad_k():
    with pytest.raises(ValueError, match="top_k"):
        TopKRouter(4, 3, RouterConfig(top_k=4))


def _routing(experts, weights) -> Routing:
    experts = torch.tensor(experts)
    stats = RoutingStats(torch.zeros(experts.shape[0], 3), torch.full((experts.shape[0], 3), 1 / 3))
    return Routing(experts, torch.tensor(weights), stats)


def test_capacity_formula():
    assert expert_capacity(num_tokens=10, top_k=2, num_experts=4, capacity_factor=1.0) == 5
    assert expert_capacity(num_tokens=10, top_k=1, num_experts=4, capacity_factor=1.0) == 3  # ceil(2.5)
    assert expert_capacity(num_tokens=8, top_k=2, num_experts=4, capacity_factor=0.5) == 2


def test_capacity_drop_by_position():
    # 6 tokens, top-1, 3 experts, factor 1 -> capacity 2. Expert 0 gets tokens 0,1,2,4: keeps 0,1.
    r = apply_capacity(
        _routing([[0], [0], [0], [1], [0], [2]], [[0.1], [0.9], [0.5], [1.0], [0.8], [1.0]]), 3, 1.0, "position"
    )
    assert r.kept_Tk.squeeze(1).tolist() == [True, True, False, True, False, True]


def test_capacity_drop_by_probability():
    # same assignments; expert 0 keeps its two most probable: tokens 1 (0.9) and 4 (0.8)
    r = apply_capacity(
        _routing([[0], [0], [0], [1], [0], [2]], [[0.1], [0.9], [0.5], [1.0], [0.8], [1.0]]), 3, 1.0, "probability"
    )
    assert r.kept_Tk.squeeze(1).tolist() == [False, True, False, True, True, True]


def test_capacity_counts_with_top2_and_extreme_skew():
    T, E, k = 16, 4, 2
    experts = torch.tensor([[0, 1]] * T)  # every token picks experts 0 and 1
    r = apply_capacity(
        Routing(experts, torch.full((T, k), 0.5), RoutingStats(torch.zeros(T, E), torch.zeros(T, E))),
        E,
        1.0,
        "position",
    )
    cap = expert_capacity(T, k, E, 1.0)  # 8
    assert r.kept_Tk[:, 0].sum() == cap and r.kept_Tk[:, 1].sum() == cap
    assert r.kept_Tk[:cap].all() and not r.kept_Tk[cap:].any()


def test_load_balancing_loss_hand_computed():
    # 4 tokens, 2 experts, top-1. Tokens 0,1,2 -> expert 0; token 3 -> expert 1.
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    experts = torch.tensor([[0], [0], [0], [1]])
    f = torch.tensor([3 / 4, 1 / 4])
    p = probs.mean(0)  # [0.65, 0.35]
    expected = 2 * float((f * p).sum())  # 2 * (0.4875 + 0.0875) = 1.15
    assert expected == pytest.approx(1.15)
    assert float(load_balancing_loss(probs, experts)) == pytest.approx(expected)


def test_load_balancing_loss_is_one_when_uniform():
    E, T = 4, 8
    probs = torch.full((T, E), 1 / E)
    experts = torch.arange(T).remainder(E)[:, None]
    assert float(load_balancing_loss(probs, experts)) == pytest.approx(1.0)


def test_sequence_scope_averages_per_sequence_losses():
    torch.manual_seed(1)
    B, S, E, k = 3, 5, 4, 2
    probs = torch.softmax(torch.randn(B * S, E), -1)
    experts = probs.topk(k, -1).indices
    per_seq = [load_balancing_loss(probs[b * S : (b + 1) * S], experts[b * S : (b + 1) * S]) for b in range(B)]
    got = load_balancing_loss(probs, experts, scope="sequence", seq_len=S)
    torch.testing.assert_close(got, torch.stack(per_seq).mean())
    # and it differs from the micro-batch scope in general
    assert not torch.allclose(got, load_balancing_loss(probs, experts))


def test_count_sync_hook_replaces_counts_but_not_probs():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2]], requires_grad=True)
    experts = torch.tensor([[0], [0]])
    global_counts = torch.tensor([5.0, 5.0])  # as if other ranks had routed to expert 1
    loss = load_balancing_loss(probs, experts, count_sync=lambda c: global_counts)
    # f = [0.5, 0.5] from the synced counts; p = local mean [0.85, 0.15]
    assert float(loss.detach()) == pytest.approx(2 * (0.5 * 0.85 + 0.5 * 0.15))
    loss.backward()
    torch.testing.assert_close(probs.grad, torch.full((2, 2), 2 * 0.5 / 2))


def test_z_loss_and_entropy_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp: log 2 and log 4
    assert float(router_z_loss(logits)) == pytest.approx((math.log(2) ** 2 + math.log(4) ** 2) / 2)
    probs = torch.softmax(logits, -1)
    h1 = math.log(2)
    h2 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert float(router_entropy(probs)) == pytest.approx((h1 + h2) / 2)
