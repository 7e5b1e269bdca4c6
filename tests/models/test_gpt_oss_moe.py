"""gpt-oss's MoE pieces: router bias, expert biases and the clamped gpt_oss activation.

Checked against Hugging Face transformers' GptOssMLP (router + experts) with random weights
mapped into ours, and the fast grouped-GEMM path against the per-expert reference in outputs
and in every gradient.

HF's layout (transformers/models/gpt_oss/modeling_gpt_oss.py):
  router.weight [E, D], router.bias [E]; route by top-k of the logits, softmax over those k
  experts.gate_up_proj [E, D, 2F] INTERLEAVED: gate = [..., ::2], up = [..., 1::2]
  experts.gate_up_proj_bias [E, 2F], interleaved the same way
  experts.down_proj [E, F, D], experts.down_proj_bias [E, D] (added before the routing weight)
"""

from __future__ import annotations

import pytest
import torch

from sparse_train.config import MoEConfig, RouterConfig
from sparse_train.models.init import ZERO_INIT
from sparse_train.models.moe import MoELayer, moe_reference_forward

D, F_HIDDEN, E, K = 32, 16, 4, 2


def _layer(limit: float = 7.0, backend: str = "torch") -> MoELayer:
    moe = MoEConfig(
        num_experts=E,
        expert_hidden=F_HIDDEN,
        expert_activation="gpt_oss",
        expert_alpha=1.702,
        expert_limit=limit,
        expert_bias=True,
        kernel_backend=backend,
    )
    return MoELayer(D, moe, RouterConfig(top_k=K, bias=True, renormalize=True, score="softmax"))


def _hf_mlp(limit: float):
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    cfg = GptOssConfig(
        hidden_size=D,
        intermediate_size=F_HIDDEN,
        num_local_experts=E,
        num_experts_per_tok=K,
        swiglu_limit=limit,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        vocab_size=64,
    )
    torch.manual_seed(0)
    mlp = GptOssMLP(cfg)
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0.0, 0.2)
    return mlp


@torch.no_grad()
def _load_from_hf(layer: MoELayer, mlp) -> None:
    hf_experts, experts = mlp.experts, layer.experts
    layer.router.weight.copy_(mlp.router.weight)
    layer.router.bias.copy_(mlp.router.bias)
    gate_up_ED2F = hf_experts.gate_up_proj  # interleaved columns: gate, up, gate, up, ...
    experts.w_gate_up.copy_(torch.stack([gate_up_ED2F[..., ::2], gate_up_ED2F[..., 1::2]], dim=2))
    bias_E2F = hf_experts.gate_up_proj_bias
    experts.b_gate_up.copy_(torch.stack([bias_E2F[:, ::2], bias_E2F[:, 1::2]], dim=1))
    experts.w_down.copy_(hf_experts.down_proj)
    experts.b_down.copy_(hf_experts.down_proj_bias)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


def test_parameter_names_shapes_and_zero_init():
    layer = _layer()
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert shapes["router.bias"] == (E,)
    assert shapes["experts.b_gate_up"] == (E, 2, F_HIDDEN)
    assert shapes["experts.b_down"] == (E, D)
    for name in ("router.bias", "experts.b_gate_up", "experts.b_down"):
        assert name.endswith(ZERO_INIT), f"{name} must start at zero"
        assert not layer.get_parameter(name).any()
    plain = MoELayer(D, MoEConfig(num_experts=E, expert_hidden=F_HIDDEN), RouterConfig(top_k=K))
    assert {n for n, _ in plain.named_parameters()} == {"router.weight", "experts.w_gate_up", "experts.w_down"}
    assert plain.experts.fused and not layer.experts.fused  # plain swiglu keeps the fused kernel


@pytest.mark.parametrize("limit", [7.0, 0.5])  # 0.5: the clamps bind on many units
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_moe_layer_equals_hf_gpt_oss_mlp(limit, backend):
    mlp = _hf_mlp(limit)
    layer = _layer(limit, backend)
    _load_from_hf(layer, mlp)
    x_BSD = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want_BSD, _ = mlp(x_BSD)
        got_BSD, _ = layer(x_BSD)
        ref_BSD = moe_reference_forward(layer, x_BSD)
    assert _rel(got_BSD, want_BSD) < 1e-5
    assert _rel(ref_BSD, want_BSD) < 1e-5
    if limit == 0.5:  # the test must exercise the clamps
        gate_up = x_BSD.reshape(-1, D) @ mlp.experts.gate_up_proj[0] + mlp.experts.gate_up_proj_bias[0]
        assert (gate_up[:, ::2] > limit).any() and (gate_up[:, 1::2].abs() > limit).any()


def _backends() -> list[str]:
    return ["torch", "reference"] + (["grouped_mm"] if hasattr(torch, "_grouped_mm") else [])


@pytest.mark.parametrize("limit", [7.0, 0.5])
@pytest.mark.parametrize("backend", _backends())
def test_fast_path_matches_per_expert_reference_in_outputs_and_all_gradients(limit, backend):
    torch.manual_seed(3)
    layer = _layer(limit, backend)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.2)
    x_BSD = torch.randn(2, 9, D)
    probe_BSD = torch.randn(2, 9, D)
    results = []
    for forward in (lambda x: layer(x)[0], lambda x: moe_reference_forward(layer, x)):
        layer.zero_grad(set_to_none=True)
        x = x_BSD.clone().requires_grad_()
        y = forward(x)
        (y * probe_BSD).sum().backward()
        grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
        results.append((y.detach(), x.grad, grads))
    (y, dx, grads), (y_ref, dx_ref, grads_ref) = results
    assert _rel(y, y_ref) < 1e-5
    assert _rel(dx, dx_ref) < 1e-5
    assert set(grads) == {
        "router.weight",
        "router.bias",
        "experts.w_gate_up",
        "experts.w_down",
        "experts.b_gate_up",
        "experts.b_down",
    }
    for name, g_ref in grads_ref.items():
        assert g_ref.abs().max() > 0, f"{name}: the reference gradient must not be trivially zero"
        assert _rel(grads[name], g_ref) < 1e-5, f"{name}: gradient differs"


def test_swiglu_with_biases_matches_reference():
    """expert_bias with the plain swiglu activation runs the grouped path too."""
    torch.manual_seed(4)
    moe = MoEConfig(num_experts=E, expert_hidden=F_HIDDEN, expert_bias=True, kernel_backend="torch")
    layer = MoELayer(D, moe, RouterConfig(top_k=K))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.2)
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        assert _rel(layer(x)[0], moe_reference_forward(layer, x)) < 1e-5
