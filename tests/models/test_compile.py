from __future__ import annotations

import pytest
import torch

from sparse_train.config import MoEConfig, RouterConfig
from sparse_train.models.moe import MoELayer


@pytest.mark.slow
def test_moe_layer_compiles_in_one_graph_and_matches_eager():
    """torch.compile traces the whole dropless MoE layer (custom ops with fake impls, no
    data-dependent shapes outside them): fullgraph=True fails on any graph break."""
    torch.manual_seed(0)
    layer = MoELayer(32, MoEConfig(num_experts=4, expert_hidden=16), RouterConfig(top_k=2))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 8, 32, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)

    def loss_and_grads(module):
        y, aux = module(x)
        loss = y.square().sum() + aux.lb_loss + aux.z_loss
        return [y, *torch.autograd.grad(loss, [x, *layer.parameters()])]

    eager, traced = loss_and_grads(layer), loss_and_grads(compiled)
    for a, b in zip(traced, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
