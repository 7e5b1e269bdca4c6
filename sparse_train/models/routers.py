"""Routers: `x_TD -> Routing`, the first seam of an MoE layer. Capacity dropping lives here too.

Shape legend: T tokens, D model width, E experts, k experts chosen per token.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from fractions import Fraction
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
    # bool; False where a slot holds no assignment: routers that pick a variable number of experts
    # per token (expert_choice, relu) give every token one slot per expert and select some
    selected_Tk: torch.Tensor | None = None

    @property
    def top_k(self) -> int:
        return self.experts_Tk.shape[1]

    @property
    def active_Tk(self) -> torch.Tensor | None:
        """The assignments the experts compute: selected and not dropped (None: every slot)."""
        if self.kept_Tk is None or self.selected_Tk is None:
            return self.kept_Tk if self.selected_Tk is None else self.selected_Tk
        return self.kept_Tk & self.selected_Tk


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
        raise ValueError(
            f"select_experts computes the top-k and Sinkhorn routers, not router.type={cfg.type!r} "
            "(selective_sinkhorn: the function of that name; the others route in TopKRouter)"
        )
    return _choose(logits_TE, expert_scores(logits_TE, cfg.score), cfg, expert_bias_E, training, token_sum)


def sinkhorn_step(step: int, fraction: float) -> bool:
    """Whether optimizer step `step` (0-based) of a selective_sinkhorn router routes by the
    transport plan: the steps where (step + 1) * fraction passes an integer, so f N of every N
    steps, evenly spread (fraction 1/4: steps 3, 7, 11, ...; fraction 1: every step). A function
    of the step alone: every rank, layout and recomputation agrees, with no collective."""
    f = Fraction(fraction).limit_denominator(1_000_000)
    return math.floor((step + 1) * f) > math.floor(step * f)


def selective_sinkhorn(
    logits_TE: torch.Tensor, cfg: RouterConfig, *, plan_now: bool, token_sum: TokenSum = _local_sum
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selective Sinkhorn routing as a function: (weights_Tk, experts_Tk). With `plan_now` (a
    selected training step: sinkhorn_step), the gates are the Sinkhorn transport plan of the
    logits with each token's row normalised to sum to 1, computed with gradients through the
    iterations; the experts are each token's top_k gates, weighted by them. Otherwise it is
    the plain softmax top-k (cfg.renormalize and cfg.scaling_factor apply to both)."""
    if plan_now:
        plan_TE = sinkhorn(logits_TE, cfg.sinkhorn_iters, token_sum)
        gates_TE = plan_TE / (plan_TE.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        gates_TE = expert_scores(logits_TE, "softmax")
    experts_Tk = gates_TE.detach().topk(cfg.top_k, dim=-1).indices
    weights_Tk = gates_TE.gather(1, experts_Tk)
    if cfg.renormalize:
        weights_Tk = weights_Tk / (weights_Tk.sum(dim=-1, keepdim=True) + 1e-20)
    return weights_Tk * cfg.scaling_factor, experts_Tk


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


def every_expert(num_tokens: int, num_experts: int, device: torch.device) -> torch.Tensor:
    """experts_Tk of a router that selects among all experts per token: slot e is expert e."""
    return torch.arange(num_experts, device=device).expand(num_tokens, num_experts).contiguous()


def expert_choice(scores_TE: torch.Tensor, seq_len: int, capacity: int) -> torch.Tensor:
    """Expert choice (Zhou et al. 2022) within each sequence: every expert takes the `capacity`
    tokens of each sequence with its highest scores. Returns selected_TE (bool). A token may be
    taken by no expert or by all; the choice reads the whole sequence, future tokens included."""
    T, E = scores_TE.shape
    scores_BSE = scores_TE.view(T // seq_len, seq_len, E)
    taken_BCE = scores_BSE.topk(min(capacity, seq_len), dim=1).indices
    selected_BSE = torch.zeros_like(scores_BSE, dtype=torch.bool).scatter_(1, taken_BCE, True)
    return selected_BSE.view(T, E)


def expert_choice_capacity(seq_len: int, top_k: int, num_experts: int, capacity_factor: float | None) -> int:
    """Tokens per sequence each expert takes: ceil(factor * S * k / E), factor null = 1, at most S."""
    return min(seq_len, expert_capacity(seq_len, top_k, num_experts, capacity_factor or 1.0))


def relu_activations(logits_TE: torch.Tensor, gain_E: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """BlockFFN's router: RMSNorm(ReLU(logits)) with a learned gain; differentiable, and exactly zero
    for every expert it does not use. Returns the activations, fp32 [T, E]."""
    return _rms_normalised(F.relu(logits_TE.float()), eps) * gain_E.float()


def _rms_normalised(a_TE: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return a_TE * torch.rsqrt(a_TE.square().mean(dim=-1, keepdim=True) + eps)


def token_sparsity(selected_TE: torch.Tensor) -> torch.Tensor:
    """TLS: the fraction of (token, expert) pairs not activated (BlockFFN)."""
    return 1.0 - selected_TE.float().mean()


def _chunks(values_TE: torch.Tensor, seq_len: int, chunk: int, fill: float) -> torch.Tensor:
    """[T, E] -> [chunks, chunk, E]: each sequence cut into runs of `chunk` consecutive tokens, the
    last one padded with `fill` (chunks never span two sequences)."""
    T, E = values_TE.shape
    per_seq = -(-seq_len // chunk)
    padded = F.pad(values_TE.view(T // seq_len, seq_len, E), (0, 0, 0, per_seq * chunk - seq_len), value=fill)
    return padded.view(-1, chunk, E)


def chunk_sparsity(selected_TE: torch.Tensor, seq_len: int, chunk: int) -> torch.Tensor:
    """CLS: the fraction of (chunk, expert) pairs that no token of the chunk activates (BlockFFN;
    chunks of `chunk` consecutive tokens of one sequence)."""
    used_CE = _chunks(selected_TE.float(), seq_len, chunk, 0.0).amax(dim=1)
    return 1.0 - used_CE.mean()


def token_sparsity_loss(logits_TE: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The TLS objective: the mean L1 norm of each token's RMS-normalised ReLU activations over E.
    At unit RMS, n equal activations have L1 sqrt(n E): the loss falls as fewer experts fire."""
    return _rms_normalised(F.relu(logits_TE.float())).sum(dim=-1).mean() / num_experts


def chunk_sparsity_loss(logits_TE: torch.Tensor, seq_len: int, chunk: int) -> torch.Tensor:
    """The CLS objective: per token and expert a soft activation q = tanh(normalised activation) in
    [0, 1); per chunk the soft probability that any of its tokens activates the expert,
    1 - prod(1 - q); its mean over chunks and experts."""
    q_TE = torch.tanh(_rms_normalised(F.relu(logits_TE.float())))
    idle_CE = (1.0 - _chunks(q_TE, seq_len, chunk, 0.0)).prod(dim=1)
    return (1.0 - idle_CE).mean()


def balancing_probs(scores_TE: torch.Tensor, score: str) -> torch.Tensor:
    """The per-token expert distribution the balancing loss and the entropy metric use: the
    softmax itself, or sigmoid scores normalised to sum to 1 (as Megatron-Core does)."""
    return scores_TE if score == "softmax" else scores_TE / (scores_TE.sum(dim=-1, keepdim=True) + 1e-20)


class TopKRouter(nn.Module):
    """The router of an MoE layer: a linear map to expert logits (fp32), then the choice of
    `cfg.type` (the config's help names each):

        topk, sinkhorn   select_experts; k slots per token
        expert_choice    per sequence, each expert's best tokens; one slot per expert, some selected
        relu             relu_activations, every non-zero one selected; one slot per expert
        selective_sinkhorn  selective_sinkhorn at the steps sinkhorn_step picks (`step`, set from
                         outside before each optimizer step), softmax top-k otherwise
        random           the top_k of a frozen random projection (`weight` is not trained), equal
                         weights: routing hashes the hidden state, with no gradient to anything

    combine="unit" gives every selected expert weight exactly 1 (straight-through to its
    weight): the experts' outputs are summed, so experts carved out of one dense FFN by a
    neuron partition add up to it when all are selected (sparse_train.upcycle).

    With cfg.bias_update_rate > 0 the router holds `expert_bias_E` (a buffer, saved in
    checkpoints), which update_expert_bias moves after each optimizer step.
    """

    def __init__(self, d_model: int, num_experts: int, cfg: RouterConfig, capacity_factor: float | None = None) -> None:
        super().__init__()
        if not 1 <= cfg.top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {cfg.top_k}")
        self.num_experts = num_experts
        self.cfg = cfg
        self.top_k = cfg.top_k
        self.capacity_factor = capacity_factor  # expert_choice's per-sequence capacity
        self.step = 0  # the optimizer step being taken (Engine.set_step): selective Sinkhorn's schedule
        self.weight = nn.Parameter(torch.empty(num_experts, d_model), requires_grad=cfg.type != "random")
        # gpt-oss: a learned bias on the logits [E] (zero-initialised: init.ZERO_INIT's ".bias"). Its
        # routing, softmax over the top-k logits, is our softmax over all E then renormalised over
        # the top k: exp(l_i) / sum_E exp(l_j) divided by sum_k exp(l_k) / sum_E exp(l_j) is
        # exp(l_i) / sum_k exp(l_k), with the same top k (softmax is monotonic). So gpt-oss is
        # score=softmax, renormalize=true, bias=true.
        self.bias = nn.Parameter(torch.zeros(num_experts), requires_grad=cfg.type != "random") if cfg.bias else None
        # relu: the RMSNorm's gain over the experts' activations
        self.gain = nn.Parameter(torch.ones(num_experts)) if cfg.type == "relu" else None
        # Sinkhorn's sums over the batch's tokens: swapped for a data-parallel all-reduce by the
        # parallel layer (never inside model code)
        self.token_sum: TokenSum = _local_sum
        self.expert_bias_E: torch.Tensor | None
        if cfg.bias_update_rate > 0:
            self.register_buffer("expert_bias_E", torch.zeros(num_experts))
        else:
            self.expert_bias_E = None

    def forward(
        self, x_TD: torch.Tensor, seq_len: int | None = None, residual_TE: torch.Tensor | None = None
    ) -> Routing:
        """`seq_len`: tokens per sequence of x_TD (sequences whole, in order), which expert_choice and
        the relu router's chunk metrics need; None = x_TD is one sequence. `residual_TE`: added to
        the logits (MoE++ gating residual)."""
        seq_len = seq_len or x_TD.shape[0]
        # Routing decisions are made in fp32 even under bf16 autocast: top-k on bf16 ties and
        # flips between steps, which makes the expert assignment noisy.
        with torch.autocast(x_TD.device.type, enabled=False):
            bias_E = self.bias.float() if self.bias is not None else None
            if self.cfg.type == "random":
                with torch.no_grad():
                    logits_TE = F.linear(x_TD.detach().float(), self.weight.float(), bias_E)
            else:
                logits_TE = F.linear(x_TD.float(), self.weight.float(), bias_E)
            if residual_TE is not None:
                logits_TE = logits_TE + residual_TE.float()
        if self.cfg.type == "relu":
            routing = self._relu(logits_TE)
        elif self.cfg.type == "expert_choice":
            routing = self._expert_choice(logits_TE, seq_len)
        elif self.cfg.type == "random":
            routing = self._random(logits_TE)
        elif self.cfg.type == "selective_sinkhorn":
            routing = self._selective_sinkhorn(logits_TE)
        else:
            scores_TE = expert_scores(logits_TE, self.cfg.score)
            # select_experts, with the scores kept for the balancing loss
            weights_Tk, experts_Tk = _choose(
                logits_TE, scores_TE, self.cfg, self.expert_bias_E, self.training, self.token_sum
            )
            routing = Routing(
                experts_Tk, weights_Tk, RoutingStats(logits_TE, balancing_probs(scores_TE, self.cfg.score))
            )
        if self.cfg.combine == "unit":
            routing = replace(routing, weights_Tk=straight_through_one(routing.weights_Tk))
        return routing

    def _expert_choice(self, logits_TE: torch.Tensor, seq_len: int) -> Routing:
        scores_TE = expert_scores(logits_TE, self.cfg.score)
        capacity = expert_choice_capacity(seq_len, self.top_k, self.num_experts, self.capacity_factor)
        selected_TE = expert_choice(scores_TE.detach(), seq_len, capacity)
        stats = RoutingStats(logits_TE, balancing_probs(scores_TE, self.cfg.score))
        experts_TE = every_expert(*scores_TE.shape, scores_TE.device)
        return Routing(experts_TE, scores_TE * self.cfg.scaling_factor, stats, selected_Tk=selected_TE)

    def _relu(self, logits_TE: torch.Tensor) -> Routing:
        assert self.gain is not None
        activations_TE = relu_activations(logits_TE, self.gain)
        fired_TE = F.relu(logits_TE.float())
        stats = RoutingStats(logits_TE, fired_TE / (fired_TE.sum(dim=-1, keepdim=True) + 1e-20))
        experts_TE = every_expert(*logits_TE.shape, logits_TE.device)
        selected_TE = logits_TE.detach() > 0  # the ReLU fired (whatever the sign of its gain)
        return Routing(experts_TE, activations_TE * self.cfg.scaling_factor, stats, selected_Tk=selected_TE)

    def _selective_sinkhorn(self, logits_TE: torch.Tensor) -> Routing:
        plan_now = self.training and sinkhorn_step(self.step, self.cfg.sinkhorn_fraction)
        weights_Tk, experts_Tk = selective_sinkhorn(logits_TE, self.cfg, plan_now=plan_now, token_sum=self.token_sum)
        return Routing(experts_Tk, weights_Tk, RoutingStats(logits_TE, expert_scores(logits_TE, "softmax")))

    def _random(self, logits_TE: torch.Tensor) -> Routing:
        experts_Tk = logits_TE.topk(self.top_k, dim=-1).indices
        weights_Tk = torch.full(experts_Tk.shape, self.cfg.scaling_factor / self.top_k, device=logits_TE.device)
        probs_TE = logits_TE.softmax(dim=-1)
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
    if routing.selected_Tk is not None:
        raise ValueError("capacity applies to a fixed number of experts per token, not to a variable selection")
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
