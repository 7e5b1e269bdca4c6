"""Routers: `x_TD -> Routing`, the first seam of an MoE layer. Capacity dropping lives here too.

Shape legend: T tokens, D model width, E experts, k experts chosen per token.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from sparse_train.config import RouterConfig
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


def expert_scores(logits_TE: torch.Tensor, score: str) -> torch.Tensor:
    """Per-expert scores (fp32): a softmax over the experts, or an independent sigmoid each."""
    if score == "softmax":
        return logits_TE.float().softmax(dim=-1)
    if score == "sigmoid":
        return torch.sigmoid(logits_TE.float())
    raise ValueError(f"unknown router score {score!r}; allowed: softmax, sigmoid")


def group_limited_topk(scores_TE: torch.Tensor, top_k: int, num_groups: int, group_top_k: int) -> torch.Tensor:
    """Top-k experts of each token among its `group_top_k` best groups (DeepSeek-V3): the
    experts form `num_groups` equal consecutive groups; a group's score is the sum of its top
    `top_k / group_top_k` expert scores. Returns experts_Tk (int64)."""
    T, E = scores_TE.shape
    per_group = top_k // group_top_k
    group_scores_TG = scores_TE.view(T, num_groups, E // num_groups).topk(per_group, dim=-1).values.sum(dim=-1)
    groups_Tg = group_scores_TG.topk(group_top_k, dim=-1, sorted=False).indices
    group_mask_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, groups_Tg, True)
    allowed_TE = group_mask_TG.repeat_interleave(E // num_groups, dim=1)
    return scores_TE.masked_fill(~allowed_TE, float("-inf")).topk(top_k, dim=-1).indices


TokenSum = Callable[[torch.Tensor], torch.Tensor]


def _local_sum(t: torch.Tensor) -> torch.Tensor:
    return t


def sinkhorn(logits_TE: torch.Tensor, iters: int, token_sum: TokenSum = _local_sum) -> torch.Tensor:
    """The Sinkhorn-balanced transport plan of exp(logits) (Megatron-Core's form, a fixed number
    of iterations): rows rescaled to mass 1/T each, columns to 1/E each, alternately. `token_sum`
    sums a per-expert vector over every token of the batch: the identity on one process, an
    all-reduce over the data-parallel ranks in a layout, so every layout balances the same batch.
    Rows are shifted by their maximum first (the plan does not change; exp cannot overflow)."""
    logits_TE = logits_TE.float()
    cost_TE = torch.exp(logits_TE - logits_TE.max(dim=-1, keepdim=True).values)
    T, E = cost_TE.shape
    tokens = token_sum(torch.full((1,), float(T), device=cost_TE.device))  # a fill, not a host copy
    d0_T = torch.ones(T, device=cost_TE.device)
    d1_E = torch.ones(E, device=cost_TE.device)
    eps = 1e-8
    for _ in range(iters):
        d0_T = 1.0 / tokens / (cost_TE @ d1_E + eps)
        d1_E = (1.0 / E) / (token_sum(d0_T @ cost_TE) + eps)
    return d1_E * cost_TE * d0_T.unsqueeze(1)


def select_experts(
    logits_TE: torch.Tensor,
    cfg: RouterConfig,
    *,
    expert_bias_E: torch.Tensor | None = None,
    training: bool = True,
    token_sum: TokenSum = _local_sum,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k family's routing as a function: (weights_Tk fp32, experts_Tk int64).

    scores = softmax or sigmoid of the logits (cfg.score); experts = the top_k of scores +
    expert_bias (the bias of aux-loss-free balancing picks experts and is never a weight),
    among each token's best groups when cfg.num_groups is set; weights = the chosen experts'
    scores, renormalised to sum to 1 when cfg.renormalize, times cfg.scaling_factor.

    Sinkhorn (cfg.type): in training the experts are the top_k of the balanced plan of the
    logits (sinkhorn, over the batch `token_sum` spans); in evaluation, of the scores."""
    if cfg.type not in ("topk", "topk_softmax", "sinkhorn"):
        raise ValueError(f"select_experts computes the top-k and Sinkhorn routers, not router.type={cfg.type!r}")
    return _choose(logits_TE, expert_scores(logits_TE, cfg.score), cfg, expert_bias_E, training, token_sum)


def _choose(
    logits_TE: torch.Tensor,
    scores_TE: torch.Tensor,
    cfg: RouterConfig,
    expert_bias_E: torch.Tensor | None,
    training: bool,
    token_sum: TokenSum,
) -> tuple[torch.Tensor, torch.Tensor]:
    selection_TE = scores_TE if expert_bias_E is None else scores_TE + expert_bias_E.float()
    if cfg.type == "sinkhorn" and training:
        with torch.no_grad():  # the plan picks; the scores weight and carry the gradient
            selection_TE = sinkhorn(logits_TE.detach(), cfg.sinkhorn_iters, token_sum)
    if cfg.num_groups is not None:
        experts_Tk = group_limited_topk(selection_TE, cfg.top_k, cfg.num_groups, cfg.group_top_k)
    else:
        experts_Tk = selection_TE.topk(cfg.top_k, dim=-1).indices
    weights_Tk = scores_TE.gather(1, experts_Tk)
    if cfg.renormalize:
        weights_Tk = weights_Tk / (weights_Tk.sum(dim=-1, keepdim=True) + 1e-20)
    return weights_Tk * cfg.scaling_factor, experts_Tk


def balancing_probs(scores_TE: torch.Tensor, score: str) -> torch.Tensor:
    """The per-token expert distribution the balancing loss and the entropy metric use: the
    softmax itself, or sigmoid scores normalised to sum to 1 (as Megatron-Core does)."""
    return scores_TE if score == "softmax" else scores_TE / (scores_TE.sum(dim=-1, keepdim=True) + 1e-20)


class TopKRouter(nn.Module):
    """Token choice: a linear map to expert logits (fp32), then select_experts (`cfg`).

    combine="unit" gives every selected expert weight exactly 1 (straight-through to its
    weight): the experts' outputs are summed, so experts carved out of one dense FFN by a
    neuron partition add up to it when all are selected (sparse_train.upcycle).

    With cfg.bias_update_rate > 0 the router holds `expert_bias_E` (a buffer, saved in
    checkpoints), which update_expert_bias moves after each optimizer step.
    """

    def __init__(self, d_model: int, num_experts: int, cfg: RouterConfig) -> None:
        super().__init__()
        if not 1 <= cfg.top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {cfg.top_k}")
        self.num_experts = num_experts
        self.cfg = cfg
        self.top_k = cfg.top_k
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        # Sinkhorn's sums over the batch's tokens: swapped for a data-parallel all-reduce by the
        # parallel layer (never inside model code)
        self.token_sum: TokenSum = _local_sum
        self.expert_bias_E: torch.Tensor | None
        if cfg.bias_update_rate > 0:
            self.register_buffer("expert_bias_E", torch.zeros(num_experts))
        else:
            self.expert_bias_E = None

    def forward(self, x_TD: torch.Tensor) -> Routing:
        # Routing decisions are made in fp32 even under bf16 autocast: top-k on bf16 ties and
        # flips between steps, which makes the expert assignment noisy.
        with torch.autocast(x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.weight.float())
        scores_TE = expert_scores(logits_TE, self.cfg.score)
        # select_experts, with the scores kept for the balancing loss
        weights_Tk, experts_Tk = _choose(
            logits_TE, scores_TE, self.cfg, self.expert_bias_E, self.training, self.token_sum
        )
        if self.cfg.combine == "unit":
            weights_Tk = straight_through_one(weights_Tk)
        return Routing(experts_Tk, weights_Tk, RoutingStats(logits_TE, balancing_probs(scores_TE, self.cfg.score)))


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
