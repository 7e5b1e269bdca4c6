"""The MoE layer, composed from four seams: router -> dispatcher -> experts -> combine, + losses.

Shape legend: B batch, S sequence, T = B*S tokens, D model width, E experts, k slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparse_train.config import MoEConfig, RouterConfig
from sparse_train.models.dispatch import LocalDispatcher
from sparse_train.models.experts import SwiGLU, SwiGLUExperts
from sparse_train.models.losses import (
    CountSync,
    GlobalBatchCounts,
    expert_counts,
    load_balancing_loss,
    local_counts,
    router_entropy,
    router_z_loss,
)
from sparse_train.models.routers import Routing, TopKSoftmaxRouter, apply_capacity


@dataclass
class MoEAux:
    """What one MoE layer returns beside its output: losses (with graph) and metrics (detached)."""

    lb_loss: torch.Tensor
    z_loss: torch.Tensor
    expert_load_E: torch.Tensor  # fraction of assignments per expert, before capacity drops
    dropped_fraction: torch.Tensor
    router_entropy: torch.Tensor


class MoELayer(nn.Module):
    def __init__(self, d_model: int, moe: MoEConfig, router: RouterConfig) -> None:
        super().__init__()
        self.num_experts = moe.num_experts
        self.capacity_factor = moe.capacity_factor
        self.drop_policy = moe.drop_policy
        self.balance_scope = router.balance_scope
        self.router = TopKSoftmaxRouter(d_model, moe.num_experts, router.top_k, router.renormalize)
        self.experts = SwiGLUExperts(moe.num_experts, d_model, moe.expert_hidden, moe.kernel_backend)
        shared_hidden = moe.num_shared_experts * (moe.shared_expert_hidden or moe.expert_hidden)
        self.shared_experts = SwiGLU(d_model, shared_hidden) if shared_hidden else None
        # Swappable from outside by the parallel layer (never set inside model code):
        self.dispatcher = LocalDispatcher(moe.num_experts)
        self.count_sync: CountSync = GlobalBatchCounts() if self.balance_scope == "global_batch" else local_counts

    def route(self, x_TD: torch.Tensor) -> Routing:
        routing = self.router(x_TD)
        if self.capacity_factor is not None:
            routing = apply_capacity(routing, self.num_experts, self.capacity_factor, self.drop_policy)
        return routing

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        routing = self.route(x_TD)
        expert_input, handle = self.dispatcher.dispatch(x_TD, routing)
        y_TD = self.dispatcher.combine(self.experts(expert_input), handle)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        return y_TD.reshape(B, S, D), self.aux(routing, seq_len=S)

    def aux(self, routing: Routing, seq_len: int) -> MoEAux:
        stats = routing.stats
        lb = load_balancing_loss(
            stats.probs_TE, routing.experts_Tk, scope=self.balance_scope, seq_len=seq_len, count_sync=self.count_sync
        )
        with torch.no_grad():
            load_E = expert_counts(routing.experts_Tk, self.num_experts)
            load_E = load_E / load_E.sum()
            kept = routing.kept_Tk
            dropped = load_E.new_zeros(()) if kept is None else 1.0 - kept.float().mean()
        return MoEAux(lb, router_z_loss(stats.logits_TE), load_E, dropped, router_entropy(stats.probs_TE))


def moe_reference_forward(layer: MoELayer, x_BSD: torch.Tensor) -> torch.Tensor:
    """The MoE layer's output by a per-expert loop over the tokens that chose it; for tests."""
    B, S, D = x_BSD.shape
    x_TD = x_BSD.reshape(B * S, D)
    routing = layer.route(x_TD)
    kept_Tk = routing.kept_Tk if routing.kept_Tk is not None else torch.ones_like(routing.experts_Tk, dtype=torch.bool)
    y_TD = torch.zeros_like(x_TD)
    for e in range(layer.num_experts):
        token_n, slot_n = torch.nonzero((routing.experts_Tk == e) & kept_Tk, as_tuple=True)
        if token_n.numel() == 0:
            continue
        out_nD = layer.experts.expert_forward(e, x_TD[token_n])
        y_TD = y_TD.index_add(0, token_n, out_nD * routing.weights_Tk[token_n, slot_n, None].to(x_TD.dtype))
    if layer.shared_experts is not None:
        y_TD = y_TD + layer.shared_experts(x_TD)
    return y_TD.reshape(B, S, D)
