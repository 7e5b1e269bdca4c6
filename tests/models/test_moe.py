from __future__ import annotations

import pytest
import torch

from sparse_train.config import MoEConfig, RouterConfig
from sparse_train.models.moe import MoELayer, moe_reference_forward


def _layer(d_model=12, seed=0, **moe_kwargs) -> MoELayer:
    torch.manual_seed(seed)
    router_kwargs = {
        k: moe_kwargs.pop(k) for k in ("top_k", "renormalize", "balance_scope", "combine") if k in moe_kwargs
    }
    layer = MoELayer(
        d_model, MoEConfig(**{"num_experts": 4, "expert_hidden": 10, **moe_kwargs}), RouterConfig(**router_kwargs)
    )
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return layer


CASES = {
    "dropless-top2": dict(top_k=2),
    "dropless-top1-no-renorm": dict(top_k=1, renormalize=False),
    "top3-of-4": dict(top_k=3),
    "capacity-position": dict(top_k=2, capacity_factor=0.5, drop_policy="position"),
    "capacity-probability": dict(top_k=2, capacity_factor=0.75, drop_policy="probability"),
    "shared-experts": dict(top_k=2, num_shared_experts=2, shared_expert_hidden=6),
    "shared-experts-gated": dict(top_k=2, num_shared_experts=1, shared_expert_gate=True),
    "unit-combine": dict(top_k=2, combine="unit"),
    "reference-kernels": dict(top_k=2, kernel_backend="reference"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_forward_and_every_gradient_match_the_per_expert_loop(case):
    layer = _layer(**dict(CASES[case]))
    x = torch.randn(3, 7, 12, requires_grad=True)
    dy = torch.randn(3, 7, 12)

    y, aux = layer(x)
    fast = torch.autograd.grad(y, [x, *layer.parameters()], dy)
    y_ref = moe_reference_forward(layer, x)
    ref = torch.autograd.grad(y_ref, [x, *layer.parameters()], dy, allow_unused=True)

    torch.testing.assert_close(y, y_ref)
    names = ["x", *(n for n, _ in layer.named_parameters())]
    for name, g_fast, g_ref in zip(names, fast, ref, strict=True):
        torch.testing.assert_close(g_fast, g_ref, msg=lambda m, name=name: f"{name}: {m}")
    assert torch.count_nonzero(fast[names.index("router.weight")]) > 0  # the router learns via the weights


def test_capacity_really_drops_and_reports_it():
    layer = _layer(top_k=2, capacity_factor=0.25)
    _, aux = layer(torch.randn(2, 8, 12))
    # capacity = ceil(0.25 * 16 * 2 / 4) = 2 per expert -> at most 8 of 32 assignments kept
    assert float(aux.dropped_fraction) >= 1 - 8 / 32
    _, aux_dropless = _layer(top_k=2)(torch.randn(2, 8, 12))
    assert float(aux_dropless.dropped_fraction) == 0.0


def test_extreme_skew_every_token_to_one_expert():
    layer = _layer(top_k=1)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2, 0] = 100.0  # expert 2 wins for every token with x[...,0] > 0
    x = torch.randn(2, 5, 12)
    x[..., 0] = x[..., 0].abs() + 1
    y, aux = layer(x)
    assert aux.expert_load_E.tolist() == [0.0, 0.0, 1.0, 0.0]
    torch.testing.assert_close(y, moe_reference_forward(layer, x))
    assert float(aux.lb_loss.detach()) == pytest.approx(4.0, rel=1e-3)  # all load on one expert: LBL -> E


def test_aux_losses_have_gradients_into_the_router_only():
    layer = _layer(top_k=2)
    _, aux = layer(torch.randn(2, 6, 12))
    grads = torch.autograd.grad(aux.lb_loss + aux.z_loss, list(layer.parameters()), allow_unused=True)
    by_name = dict(zip((n for n, _ in layer.named_parameters()), grads, strict=True))
    assert by_name["router.weight"] is not None and torch.count_nonzero(by_name["router.weight"]) > 0
    assert all(g is None for n, g in by_name.items() if n != "router.weight")


def test_sequence_scope_is_used_by_the_layer():
    x = torch.randn(3, 6, 12)
    _, micro = _layer(top_k=2, balance_scope="micro_batch")(x)
    _, seq = _layer(top_k=2, balance_scope="sequence")(x)
    assert not torch.allclose(micro.lb_loss, seq.lb_loss)
