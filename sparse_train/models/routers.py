"""Routers: `x_TD -> Routing`, the first seam of an MoE layer. Capacity dropping lives here too.

Shape legend: T tokens, D model width, E experts, k experts chosen per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from sparse_train.kernels import count_per_expert


@dataclass
class RoutingStats:
    """What the losses and metrics need; all fp32."""

    logits_TE: torch.Tensor
    probs_TE: torch.Tensor


@dataclass
class Routing:
    experts_Tk: torch.Tensor  # int64 expert index per (token, slot)
    weights_Tk: torch.Tensor  # fp32 combine weight per (token, slot)
    stats: RoutingStats
    kept_Tk: torch.Tensor | None = None  # bool; False where capacity dropped the assignment

    @property
    def top_k(self) -> int:
        return self.experts_Tk.shape[1]


class _StraightThroughOne(torch.autograd.Function):
    """Exactly 1 in the forward; the gradient passes to `p` unchanged in the backward."""

    @staticmethod
    def forward(ctx, p: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(p)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def straight_through_one(p: torch.Tensor) -> torch.Tensor:
    """Ones with the gradient of `p`: a combine weight of exactly 1 whose router still learns."""
    return _StraightThroughOne.apply(p)


class TopKSoftmaxRouter(nn.Module):
    """Softmax over expert logits (fp32), keep the k largest; optionally renormalise them (Mixtral).

    combine="unit" gives every selected expert weight exactly 1 (straight-through to its
    probability): the experts' outputs are summed, so experts carved out of one dense FFN by
    a neuron partition add up to it when all are selected (sparse_train.upcycle).
    """

    def __init__(
        self, d_model: int, num_experts: int, top_k: int, renormalize: bool = True, combine: str = "weights"
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.combine = combine
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))

    def forward(self, x_TD: torch.Tensor) -> Routing:
        # Routing decisions are made in fp32 even under bf16 autocast: top-k on bf16 ties and
        # flips between steps, which makes the expert assignment noisy.
        with torch.autocast(x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.weight.float())
        probs_TE = logits_TE.softmax(dim=-1)
        weights_Tk, experts_Tk = probs_TE.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights_Tk = weights_Tk / weights_Tk.sum(dim=-1, keepdim=True)
        if self.combine == "unit":
            weights_Tk = straight_through_one(weights_Tk)
        return Routing(experts_Tk, weights_Tk, RoutingStats(logits_TE, probs_TE))


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """ceil(capacity_factor * T * k / E): assignments an expert accepts per micro-batch."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def apply_capacity(
    routing: Routing,
    num_experts: int,
    capacity_factor: float,
    policy: Literal["position", "probability"],
) -> Routing:
    """Mark assignments beyond each expert's capacity as dropped.

    position:    an expert keeps the assignments of the earliest tokens (Megatron's order).
    probability: an expert keeps the assignments with the highest router probability.
    """
    T, k = routing.experts_Tk.shape
    capacity = expert_capacity(T, k, num_experts, capacity_factor)
    experts_A = routing.experts_Tk.reshape(-1)  # A = T*k assignments, token-major
    if policy == "position":
        order_A = torch.argsort(experts_A, stable=True)
    elif policy == "probability":
        by_prob_A = torch.argsort(routing.weights_Tk.reshape(-1), descending=True, stable=True)
        order_A = by_prob_A[torch.argsort(experts_A[by_prob_A], stable=True)]
    else:
        raise ValueError(f"unknown drop policy {policy!r}; allowed: position, probability")
    counts_E = count_per_expert(experts_A, num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    sorted_experts_A = experts_A[order_A]
    rank_in_expert_A = torch.arange(experts_A.numel(), device=experts_A.device) - starts_E[sorted_experts_A]
    kept_A = torch.empty_like(experts_A, dtype=torch.bool)
    kept_A[order_A] = rank_in_expert_A < capacity
    kept_Tk = kept_A.view(T, k)
    if routing.kept_Tk is not None:
        kept_Tk = kept_Tk & routing.kept_Tk
    return replace(routing, kept_Tk=kept_Tk)
