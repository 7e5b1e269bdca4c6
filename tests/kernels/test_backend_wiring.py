"""The kernel backends as the rest of the package chooses them: config literals, the MoE and FFF
layers, and a training run, with the grouped_mm backend (torch._grouped_mm's CPU kernel here)."""

from __future__ import annotations

import json
import typing

import pytest
import torch

from sparse_train.config import FFFConfig, MoEConfig, RouterConfig
from sparse_train.kernels import BACKENDS
from sparse_train.models.fff import FFFLayer
from sparse_train.models.moe import MoELayer, moe_reference_forward
from tests.conftest import tiny_config
from tests.kernels.helpers import TOL, requires_grouped_mm


def test_config_offers_exactly_the_kernel_backends():
    """config.py may not import kernels (the CLI's --help imports no torch), so the literals are
    written twice; this keeps them equal."""
    for section in (MoEConfig, FFFConfig):
        field_type = typing.get_type_hints(section)["kernel_backend"]
        assert typing.get_args(field_type) == BACKENDS, section.__name__


@requires_grouped_mm
def test_moe_layer_with_grouped_mm_matches_the_per_expert_loop():
    torch.manual_seed(0)
    layer = MoELayer(16, MoEConfig(num_experts=4, expert_hidden=8, kernel_backend="grouped_mm"), RouterConfig(top_k=2))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x, dy = torch.randn(3, 7, 16, requires_grad=True), torch.randn(3, 7, 16)
    y, _ = layer(x)
    got = torch.autograd.grad(y, [x, *layer.parameters()], dy)
    y_ref = moe_reference_forward(layer, x)
    want = torch.autograd.grad(y_ref, [x, *layer.parameters()], dy, allow_unused=True)
    torch.testing.assert_close(y, y_ref)
    for name, a, b in zip(["x", *(n for n, _ in layer.named_parameters())], got, want, strict=True):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")


@requires_grouped_mm
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_fff_leaves_with_grouped_mm_match_the_reference_backend(activation):
    """GELU leaves go through grouped_gemm, SwiGLU leaves through swiglu_experts."""
    outputs = {}
    for backend in ("grouped_mm", "reference"):
        torch.manual_seed(0)
        cfg = FFFConfig(depth=2, leaf_width=8, leaf_activation=activation, mode="soft", kernel_backend=backend)
        layer = FFFLayer(16, cfg)
        for p in layer.parameters():  # a bare layer's parameters are not initialised (the model does that)
            torch.nn.init.normal_(p, std=0.4)
        x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        y = layer(x)[0]
        outputs[backend] = [y, *torch.autograd.grad(y.square().sum(), [x, *layer.parameters()])]
    for a, b in zip(outputs["grouped_mm"], outputs["reference"], strict=True):
        torch.testing.assert_close(a, b, **TOL[torch.float32])  # summation order differs


@requires_grouped_mm
def test_training_with_grouped_mm_follows_the_torch_backend(tmp_path):
    from sparse_train.train.trainer import Trainer

    losses = {}
    for backend in ("grouped_mm", "torch"):
        cfg = tiny_config(f"moe.kernel_backend={backend}", "train.steps=3", "checkpoint.save_final=false")
        Trainer(cfg, tmp_path / backend).fit()
        records = [json.loads(line) for line in (tmp_path / backend / "metrics.jsonl").read_text().splitlines()]
        losses[backend] = [r["loss"] for r in records if "loss" in r]
    assert len(losses["torch"]) == 3
    assert losses["grouped_mm"] == pytest.approx(losses["torch"], rel=1e-5)
