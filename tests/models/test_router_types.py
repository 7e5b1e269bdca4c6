"""The routers that pick a variable number of experts per token (expert choice, BlockFFN's ReLU
router) and the random control: each checked against its formula, by hand or by a direct loop,
and through the MoE layer against its per-expert reference."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from sparse_train.config import ConfigError, MoEConfig, RouterConfig, load_config
from sparse_train.models.moe import MoELayer, moe_reference_forward
from sparse_train.models.routers import (
    chunk_sparsity,
    chunk_sparsity_loss,
    expert_choice,
    expert_choice_capacity,
    relu_activations,
    selective_sinkhorn,
    sinkhorn,
    sinkhorn_step,
    token_sparsity,
    token_sparsity_loss,
)


def _layer(router: RouterConfig, **moe) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(16, MoEConfig(num_experts=4, expert_hidden=8, **moe), router)
    with torch.no_grad():
        for p in layer.parameters():
            if p.dim() > 1:
                p.normal_(std=0.3)
    return layer


def test_expert_choice_takes_each_experts_best_tokens_of_every_sequence():
    torch.manual_seed(1)
    seq_len, capacity = 6, 2
    scores = torch.rand(3 * seq_len, 4)
    selected = expert_choice(scores, seq_len, capacity)
    for b in range(3):
        rows = slice(b * seq_len, (b + 1) * seq_len)
        for e in range(4):
            best = set(scores[rows, e].topk(capacity).indices.tolist())
            assert set(torch.nonzero(selected[rows, e]).flatten().tolist()) == best
    # ceil(1.5 * 6 * 2 / 4) = 5 tokens per expert and sequence; never more than the sequence
    assert expert_choice_capacity(6, 2, 4, 1.5) == 5 and expert_choice_capacity(6, 4, 4, 2.0) == 6
    assert expert_choice_capacity(6, 2, 4, None) == 3


def test_expert_choice_sees_the_future_of_its_sequence():
    """The documented leak: changing a later token changes whether an earlier one is taken."""
    scores = torch.tensor([[0.5], [0.4], [0.1]])
    assert expert_choice(scores, 3, 1)[:, 0].tolist() == [True, False, False]
    scores[2, 0] = 0.9  # the last token outbids the first
    assert expert_choice(scores, 3, 1)[:, 0].tolist() == [False, False, True]


def test_expert_choice_layer_matches_its_reference_and_balances_exactly():
    layer = _layer(RouterConfig(type="expert_choice", top_k=2), capacity_factor=1.0)
    x = torch.randn(2, 8, 16)
    y, aux = layer(x)
    torch.testing.assert_close(y, moe_reference_forward(layer, x), rtol=1e-5, atol=1e-6)
    assert aux.load.tolist() == [0.25] * 4  # every expert takes 4 of each sequence's 8 tokens
    assert aux.metrics["experts_per_token"].item() == pytest.approx(2.0)


def test_relu_router_is_rmsnorm_of_relu_with_a_gain():
    logits = torch.tensor([[1.0, -2.0, 3.0, 0.0]])
    gain = torch.tensor([1.0, 1.0, 0.5, 2.0])
    rms = math.sqrt((1.0 + 9.0) / 4)
    expected = torch.tensor([[1.0 / rms, 0.0, 0.5 * 3.0 / rms, 0.0]])
    torch.testing.assert_close(relu_activations(logits, gain), expected, rtol=1e-5, atol=1e-6)


def test_relu_layer_uses_a_variable_number_of_experts_and_trains_its_router():
    layer = _layer(RouterConfig(type="relu", tls_coef=0.1, cls_coef=0.1, chunk_size=4))
    x = torch.randn(2, 8, 16, requires_grad=True)
    y, aux = layer(x)
    torch.testing.assert_close(y, moe_reference_forward(layer, x), rtol=1e-5, atol=1e-5)
    routing = layer.route(x.reshape(-1, 16), 8)
    per_token = routing.selected_Tk.sum(-1)
    assert per_token.min() < per_token.max()  # variable, not a fixed top_k
    torch.testing.assert_close(aux.metrics["experts_per_token"], per_token.float().mean())
    torch.testing.assert_close(aux.metrics["token_sparsity"], 1 - routing.selected_Tk.float().mean())
    (y.square().sum() + aux.objective).backward()
    assert layer.router.weight.grad.abs().sum() > 0 and layer.router.gain.grad.abs().sum() > 0


def test_token_and_chunk_sparsity_by_hand():
    # two sequences of 4 tokens, 3 experts; chunks of 2
    selected = torch.tensor(
        [[1, 0, 0], [0, 1, 0], [1, 0, 0], [1, 0, 0], [0, 0, 0], [0, 0, 1], [0, 0, 0], [0, 0, 0]], dtype=torch.bool
    )
    assert token_sparsity(selected).item() == pytest.approx(1 - 5 / 24)
    # chunks: {e0,e1}, {e0}, {e2}, {}: 4 of 12 (chunk, expert) pairs used
    assert chunk_sparsity(selected, seq_len=4, chunk=2).item() == pytest.approx(1 - 4 / 12)
    # a chunk never spans two sequences: seq_len 3 with chunk 2 pads each sequence's last chunk,
    # so the chunks are {t0,t1}: e0,e1; {t2}: e0; {t3,t4}: e0; {t5}: e2: 5 of 12 pairs used
    assert chunk_sparsity(selected[:6], seq_len=3, chunk=2).item() == pytest.approx(1 - 5 / 12)


def test_the_sparsity_objectives_fall_as_fewer_experts_fire():
    E = 8
    dense, sparse = torch.ones(1, E), torch.tensor([[1.0] + [-1.0] * (E - 1)])
    # at unit RMS, n equal activations have L1 sqrt(n E): the TLS objective is sqrt(n / E)
    assert token_sparsity_loss(dense, E).item() == pytest.approx(1.0, rel=1e-5)
    assert token_sparsity_loss(sparse, E).item() == pytest.approx(math.sqrt(1 / E), rel=1e-5)
    same = torch.tensor([[1.0, -1.0]] * 4)  # every token of the chunk uses expert 0 only
    varied = torch.tensor([[1.0, -1.0], [-1.0, 1.0]] * 2)  # the chunk uses both experts
    assert chunk_sparsity_loss(same, seq_len=4, chunk=4) < chunk_sparsity_loss(varied, seq_len=4, chunk=4)


def test_random_router_is_frozen_and_sends_no_gradient():
    layer = _layer(RouterConfig(type="random", top_k=2))
    x = torch.randn(2, 8, 16)
    routing = layer.route(x.reshape(-1, 16), 8)
    assert torch.equal(routing.experts_Tk, layer.route(x.reshape(-1, 16), 8).experts_Tk)  # a fixed function of x
    assert routing.weights_Tk.unique().tolist() == [0.5]
    assert not layer.router.weight.requires_grad
    x.requires_grad_(True)
    _, aux = layer(x)
    assert not aux.objective.requires_grad  # its losses are constants: nothing to balance with


def test_selective_sinkhorn_plans_on_an_even_fraction_of_steps():
    assert [s for s in range(12) if sinkhorn_step(s, 0.25)] == [3, 7, 11]
    assert [s for s in range(30) if sinkhorn_step(s, 0.1)] == [9, 19, 29]
    assert all(sinkhorn_step(s, 1.0) for s in range(5))


def test_selective_sinkhorn_gates_are_the_plans_rows_and_carry_gradients():
    torch.manual_seed(2)
    cfg = RouterConfig(type="selective_sinkhorn", top_k=2, renormalize=False)
    skewed = (torch.randn(64, 4) + torch.tensor([3.0, 0.0, 0.0, 0.0])).requires_grad_(True)
    weights, experts = selective_sinkhorn(skewed, cfg, plan_now=True)
    plan = sinkhorn(skewed.detach(), cfg.sinkhorn_iters)
    gates = plan / plan.sum(dim=-1, keepdim=True)
    assert torch.equal(experts, gates.topk(2, dim=-1).indices)
    torch.testing.assert_close(weights.detach(), gates.gather(1, experts))
    soft_weights, soft_experts = selective_sinkhorn(skewed, cfg, plan_now=False)
    assert torch.equal(soft_experts, skewed.detach().softmax(-1).topk(2, dim=-1).indices)
    # the plan balances: the skewed expert 0 is no longer in every token's choice
    assert (experts == 0).any(-1).float().mean() < 0.75 < (soft_experts == 0).any(-1).float().mean()
    (weights * torch.arange(2.0)).sum().backward()
    assert skewed.grad.abs().sum() > 0  # through the Sinkhorn iterations


def test_selective_sinkhorn_router_follows_the_step_and_evaluates_by_softmax():
    layer = _layer(RouterConfig(type="selective_sinkhorn", top_k=2, sinkhorn_fraction=0.5))
    x_TD = torch.randn(16, 16)
    logits = x_TD @ layer.router.weight.T

    def chosen(step: int, training: bool) -> torch.Tensor:
        layer.train(training)
        layer.router.step = step
        return layer.route(x_TD).experts_Tk

    plan_choice = selective_sinkhorn(logits, layer.router_cfg, plan_now=True)[1]
    softmax_choice = selective_sinkhorn(logits, layer.router_cfg, plan_now=False)[1]
    assert not torch.equal(plan_choice, softmax_choice)
    assert torch.equal(chosen(1, True), plan_choice)  # steps 1, 3, ... at fraction 1/2
    assert torch.equal(chosen(2, True), softmax_choice)
    assert torch.equal(chosen(1, False), softmax_choice)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["router.type=relu", "router.bias_update_rate=0.01"], "router.type"),
        (["router.type=expert_choice", "router.num_groups=2", "router.group_top_k=1"], "router.type"),
        (["router.tls_coef=0.1"], "router.tls_coef"),
        (["router.type=relu", "router.score=sigmoid"], "router.score"),
        (["router.type=relu", "moe.capacity_factor=1.0"], "moe.capacity_factor"),
        (["router.type=relu", "router.chunk_size=0"], "router.chunk_size"),
        (["router.type=selective_sinkhorn", "router.sinkhorn_fraction=0"], "router.sinkhorn_fraction"),
        (["router.type=selective_sinkhorn", "router.score=sigmoid"], "router.score"),
        (["moe.zero_experts=-1"], "moe.zero_experts"),
        (["moe.zero_experts=1", "router.num_groups=2", "router.group_top_k=1"], "router.num_groups"),
        (["moe.num_experts=2", "moe.copy_experts=1", "router.top_k=4"], "router.top_k"),
        (["model.ffn=fff", "moe.gating_residual=true"], "moe.gating_residual"),
    ],
)
def test_invalid_combinations_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["moe.num_experts=8", *overrides])


@pytest.mark.parametrize("router_type", ["expert_choice", "relu", "random"])
def test_hf_export_refuses_routers_without_a_format(router_type):
    from sparse_train.upcycle.hf import export_arch

    with pytest.raises(ConfigError, match="router.type"):
        export_arch(load_config(None, ["moe.num_experts=8", f"router.type={router_type}"]))


RESUMED = {
    "expert_choice": ["router.type=expert_choice"],
    "relu": ["router.type=relu", "router.tls_coef=0.01", "router.cls_coef=0.01"],
    "random": ["router.type=random"],
    # steps 1 and 3: one plan step on each side of the resume
    "selective_sinkhorn": ["router.type=selective_sinkhorn", "router.sinkhorn_fraction=0.5"],
    "deepseek": ["router.score=sigmoid", "router.num_groups=2", "router.group_top_k=1", "router.bias_update_rate=0.01"],
    "moe++": ["moe.zero_experts=1", "moe.copy_experts=1", "moe.constant_experts=1", "moe.gating_residual=true"],
}


@pytest.mark.parametrize("choice", list(RESUMED))
def test_each_router_trains_and_resumes_exactly(choice, tmp_path):
    from sparse_train.train.trainer import Trainer
    from tests.conftest import tiny_config

    overrides = [*RESUMED[choice], "train.steps=4", "checkpoint.every=2", "optimizer.warmup_steps=1"]
    straight = Trainer(tiny_config(*overrides), tmp_path / "straight", log=lambda m: None)
    try:
        losses = [straight.train_step()["loss"] for _ in range(4)]
    finally:
        straight.close()
    first = Trainer(tiny_config(*overrides), tmp_path / "resumed", log=lambda m: None)
    try:
        resumed = [first.train_step()["loss"] for _ in range(2)]
        first.save()
    finally:
        first.close()
    second = Trainer(tiny_config(*overrides), tmp_path / "resumed", resume="auto", log=lambda m: None)
    try:
        resumed += [second.train_step()["loss"] for _ in range(2)]
    finally:
        second.close()
    assert resumed == losses  # bit-exact on CPU
    assert losses[-1] < losses[0] or choice == "random"


def _zero_computation_by_loop(layer: MoELayer, x_TD: torch.Tensor, routing) -> torch.Tensor:
    """The zero-computation experts' share, slot by slot, from their definitions (MoE++)."""
    zc = layer.zero_computation
    y = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for slot in range(routing.top_k):
            e, w = int(routing.experts_Tk[t, slot]), routing.weights_Tk[t, slot]
            copy_at, constant_at = zc.first + zc.zero, zc.first + zc.zero + zc.copy
            if copy_at <= e < constant_at:
                y[t] += w * x_TD[t]
            elif e >= constant_at:
                j = e - constant_at
                a1, a2 = (zc.constant_gates[j] @ x_TD[t]).softmax(-1)
                y[t] += w * (a1 * x_TD[t] + a2 * zc.constant_vectors[j])
    return y


def test_zero_computation_experts_by_their_definitions_and_outside_the_dispatch():
    layer = _layer(RouterConfig(top_k=3), zero_experts=1, copy_experts=1, constant_experts=2)
    x = torch.randn(2, 8, 16)
    x_TD = x.reshape(-1, 16)
    routing = layer.route(x_TD, 8)
    kinds = layer.zero_computation.kind_of(routing.experts_Tk)
    assert set(kinds.unique().tolist()) == {0, 1, 2, 3}  # every kind is chosen somewhere
    ffn = layer.ffn_routing(routing)
    expert_input, _ = layer.dispatcher.dispatch(x_TD, ffn)
    assert int(expert_input.counts_E.sum()) == int((routing.experts_Tk < 4).sum())  # only FFN work is dispatched
    y, aux = layer(x)
    ffn_only = moe_reference_forward(layer, x).reshape(-1, 16) - layer.zero_computation.output(x_TD, routing)
    torch.testing.assert_close(
        y.reshape(-1, 16), ffn_only + _zero_computation_by_loop(layer, x_TD, routing), rtol=1e-5, atol=1e-5
    )
    shares = [aux.metrics[f"{k}_fraction"].item() for k in ("ffn", "zero", "copy", "constant")]
    assert sum(shares) == pytest.approx(1.0) and all(s > 0 for s in shares)
    assert aux.metrics["experts_per_token"].item() == pytest.approx(
        float((routing.experts_Tk < 4).sum(-1).float().mean())
    )
    assert aux.load.shape == (4 + 1 + 1 + 2,)  # balanced over every choice, like any expert


@pytest.mark.parametrize("option", ["zero_experts=1", "copy_experts=1", "constant_experts=1", "gating_residual=true"])
def test_hf_export_refuses_moe_plus_plus(option):
    from sparse_train.upcycle.hf import export_arch

    with pytest.raises(ConfigError, match=f"moe.{option.split('=')[0]}"):
        export_arch(load_config(None, ["moe.num_experts=8", f"moe.{option}"]))


def test_gating_residual_adds_the_projected_previous_logits():
    layer = MoELayer(
        16, MoEConfig(num_experts=4, expert_hidden=8, gating_residual=True), RouterConfig(), follows_moe=True
    )
    torch.manual_seed(3)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=0.3)
    x_TD, previous_TE = torch.randn(8, 16), torch.randn(8, 4)
    routing = layer.route(x_TD, 8, previous_TE)
    expected = x_TD @ layer.router.weight.T + previous_TE @ layer.gating_residual.weight.T
    torch.testing.assert_close(routing.stats.logits_TE, expected, rtol=1e-5, atol=1e-5)
    _, aux = layer(x_TD.view(1, 8, 16), previous_TE)
    torch.testing.assert_close(aux.carry, expected, rtol=1e-5, atol=1e-5)  # what the next MoE layer reads
    assert aux.detached().carry is None  # records never hold the graph
    first = MoELayer(16, MoEConfig(num_experts=4, expert_hidden=8, gating_residual=True), RouterConfig())
    assert first.gating_residual is None  # the first MoE layer has no previous logits


def test_gating_residual_starts_as_the_plain_model_and_then_learns():
    from sparse_train.models.transformer import Transformer
    from tests.conftest import tiny_config

    def model(*overrides: str) -> Transformer:
        cfg = tiny_config("model.n_layers=3", *overrides)
        m = Transformer(replace(cfg.model, vocab_size=64), cfg.moe, cfg.router, cfg.fff)
        m.reset_parameters(seed=7)
        return m

    tokens = torch.randint(0, 64, (2, 16))
    plain, residual = model(), model("moe.gating_residual=true")
    torch.testing.assert_close(residual(tokens).logits_BSV, plain(tokens).logits_BSV)  # zero projections
    residual(tokens).logits_BSV.square().sum().backward()
    grads = [b.ffn.gating_residual.weight.grad for b in residual.blocks if b.ffn.gating_residual is not None]
    assert len(grads) == 2 and all(g.abs().sum() > 0 for g in grads)
