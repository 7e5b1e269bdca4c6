"""FlopCounterMode counts our custom expert ops as the plain matmuls they replace: the fused
SwiGLU experts and the grouped GEMMs (forward and backward) against the reference backend's
per-expert matmuls, on the same routing."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sparse_train.config import MoEConfig, RouterConfig
from sparse_train.models.moe import MoELayer


def _flops(backend: str, **moe: object) -> tuple[int, int]:
    torch.manual_seed(0)
    layer = MoELayer(
        32, MoEConfig(num_experts=4, expert_hidden=24, kernel_backend=backend, **moe), RouterConfig(top_k=2)
    )
    x = torch.randn(2, 16, 32, requires_grad=True)
    with FlopCounterMode(display=False) as forward:
        y, _aux = layer(x)
    with FlopCounterMode(display=False) as backward:
        y.sum().backward()
    return forward.get_total_flops(), backward.get_total_flops()


@pytest.mark.parametrize("moe", [{}, {"expert_activation": "gpt_oss", "expert_bias": True}], ids=["swiglu", "gpt-oss"])
def test_custom_expert_ops_count_the_flops_of_the_reference_matmuls(moe):
    fused, reference = _flops("torch", **moe), _flops("reference", **moe)
    assert fused[0] > 0 and fused == reference
