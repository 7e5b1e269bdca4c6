"""Fast Feedforward (FFF) layers: a binary tree of node neurons routes each token to leaf FFNs.

A tree of depth d has N = 2^d - 1 node neurons, numbered in level order (node n's children are
2n+1 on the left, 2n+2 on the right), each a scalar logit c_n = <w_n, x> + b_n, and L = 2^d
leaves, each a small FFN of width l (SwiGLU or GELU). Going right at node n has probability
sigmoid(c_n); a leaf's probability is the product along its path, and the leaf index is the
path's decisions read as a binary number, root first (right = 1).

The FFF layer is the MoE pipeline with a tree for a router (docs/decisions.md §21): the tree yields a
`Routing` over leaves, the same dispatcher moves tokens to them (so leaves shard across EP
ranks like experts), and the leaves are stacked `Experts` computed by the expert kernels.

Training modes (fff.mode):
    soft        every leaf, weighted by its path probability (the reference; small trees)
    topk_paths  the top_k most probable leaves, weights renormalised to sum to 1 (or, with
                fff.combine: unit, each exactly 1 with a straight-through gradient)
    hard        the descent's leaf (go right iff c_n >= 0), weight 1 in the forward and the
                gradient of its path probability in the backward (straight-through)
Evaluation always descends hard (FFF inference): `fff_hard_forward`, through the fused kernel
sparse_train.kernels.fff_infer where it applies, else the torch path here.

Losses (docs/decisions.md §22):
    leaf balancing  L * sum_i f_i p_i, MoE-style: f_i the share of tokens whose selected leaf
                    (soft and hard: the descent's leaf; topk_paths: each of the k) is i, through
                    the same balance_scope count sync as the MoE router; p_i mean path probability
    hardening       mean over tokens and nodes of the binary entropy of sigmoid(c_n) (nats), as
                    the original FFF's per-node entropies
Master leaf: an always-on FFN blended as y = (1 - a) * tree(x) + a * master(x), a = sigmoid(m)
with m trained (starting at a = 0.5).

Shape legend: T tokens, D model width, N nodes, L leaves, k leaves per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparse_train.config import FFFConfig
from sparse_train.kernels import count_per_expert
from sparse_train.kernels.fff_infer import fused_hard_forward
from sparse_train.models.dispatch import ExpertInput, LocalDispatcher
from sparse_train.models.experts import GELU, GELUExperts, SwiGLU, SwiGLUExperts, local_shard
from sparse_train.models.losses import load_balancing_loss
from sparse_train.models.routers import Routing, RoutingStats, straight_through_one
from sparse_train.models.sparse import SparseAux, SparseFFN

SHARP_MARGIN = 0.05  # a decision is "sharp" when sigmoid(c) is within this of 0 or 1


def level_nodes(level: int) -> slice:
    """Node indices of one tree level, in level order."""
    return slice(2**level - 1, 2 ** (level + 1) - 1)


def leaf_log_probs(logits_TN: torch.Tensor, depth: int) -> torch.Tensor:
    """[T, L] log path probability of every leaf, built level by level from the root."""
    logp_TP = logits_TN.new_zeros(logits_TN.shape[0], 1)
    for level in range(depth):
        c_TP = logits_TN[:, level_nodes(level)]  # one logit per node (= per path so far) of this level
        # children of position p are 2p (left, 1 - sigmoid) and 2p + 1 (right, sigmoid)
        logp_TP = torch.stack([logp_TP + F.logsigmoid(-c_TP), logp_TP + F.logsigmoid(c_TP)], dim=-1).flatten(1)
    return logp_TP


def descend(logits_TN: torch.Tensor, depth: int) -> torch.Tensor:
    """[T] int64 leaf reached by going right wherever the node's logit is >= 0."""
    node_T = torch.zeros(logits_TN.shape[0], dtype=torch.int64, device=logits_TN.device)
    for _ in range(depth):
        right_T = logits_TN.gather(1, node_T[:, None])[:, 0] >= 0
        node_T = 2 * node_T + 1 + right_T.long()
    return node_T - (2**depth - 1)


def decision_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Binary entropy (nats) of sigmoid(c), elementwise, stable for large |c|."""
    p = torch.sigmoid(logits)
    return p * F.softplus(-logits) + (1 - p) * F.softplus(logits)


class TreeRouter(nn.Module):
    """The node neurons: N scalar logits per token, in fp32 (as the MoE router's)."""

    def __init__(self, d_model: int, depth: int) -> None:
        super().__init__()
        self.depth = depth
        self.node_weight = nn.Parameter(torch.empty(2**depth - 1, d_model))
        self.node_bias = nn.Parameter(torch.zeros(2**depth - 1))

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x_TD.device.type, enabled=False):
            return F.linear(x_TD.float(), self.node_weight.float(), self.node_bias.float())


class FFFAux(SparseAux):
    """The FFF layer's SparseAux, with its parts by name."""

    @property
    def lb_loss(self) -> torch.Tensor:
        return self.losses["aux_loss"]

    @property
    def hardening_loss(self) -> torch.Tensor:
        return self.losses["hardening_loss"]


class FFFLayer(SparseFFN):
    kind = "fff"

    def __init__(self, d_model: int, cfg: FFFConfig, d_out: int | None = None) -> None:
        super().__init__()
        self._init_seams(cfg.num_leaves, cfg.balance_scope)
        self.cfg = cfg
        self.depth = cfg.depth
        self.tree = TreeRouter(d_model, cfg.depth)
        d_out = d_out or d_model
        if cfg.leaf_activation == "swiglu":
            if d_out != d_model:
                raise ValueError("SwiGLU leaves map d_model to d_model; use leaf_activation=gelu for another width")
            self.experts: nn.Module = SwiGLUExperts(cfg.num_leaves, d_model, cfg.leaf_width, cfg.kernel_backend)
        else:
            self.experts = GELUExperts(cfg.num_leaves, d_model, cfg.leaf_width, cfg.kernel_backend, d_out)
        self.master: nn.Module | None = None
        if cfg.master_leaf:
            width = cfg.master_leaf_width or cfg.leaf_width
            self.master = SwiGLU(d_model, width) if cfg.leaf_activation == "swiglu" else GELU(d_model, width, d_out)
            self.master_logit = nn.Parameter(torch.zeros(1))  # [1], not a scalar: FSDP2 shards no 0-d parameter

    # ---- parameter groups (different learning rates for nodes and leaves) ------------------
    def node_parameters(self) -> list[nn.Parameter]:
        return list(self.tree.parameters())

    def leaf_parameters(self) -> list[nn.Parameter]:
        nodes = {id(p) for p in self.node_parameters()}
        return [p for p in self.parameters() if id(p) not in nodes]

    # ---- routing ----------------------------------------------------------------------------
    def route(self, x_TD: torch.Tensor) -> tuple[Routing, torch.Tensor]:
        """The routing over leaves for this layer's mode, and the leaves f_i counts ([T, k'])."""
        logits_TN = self.tree(x_TD)
        probs_TL = leaf_log_probs(logits_TN, self.depth).exp()
        hard_T1 = descend(logits_TN.detach(), self.depth)[:, None]
        mode = self.cfg.mode if self.training else "hard"
        if mode == "soft":
            leaves_Tk = torch.arange(self.num_experts, device=x_TD.device).expand(x_TD.shape[0], -1)
            routing, counted = Routing(leaves_Tk, probs_TL, RoutingStats(logits_TN, probs_TL)), hard_T1
        elif mode == "topk_paths":
            weights_Tk, leaves_Tk = probs_TL.topk(self.cfg.top_k, dim=-1)
            weights_Tk = weights_Tk / weights_Tk.sum(dim=-1, keepdim=True)
            if self.cfg.combine == "unit":
                weights_Tk = straight_through_one(weights_Tk)
            routing, counted = Routing(leaves_Tk, weights_Tk, RoutingStats(logits_TN, probs_TL)), leaves_Tk
        else:
            weights_T1 = straight_through_one(probs_TL.gather(1, hard_T1))
            routing, counted = Routing(hard_T1, weights_T1, RoutingStats(logits_TN, probs_TL)), hard_T1
        return routing, counted

    def blend(self) -> torch.Tensor:
        return torch.sigmoid(self.master_logit)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, FFFAux]:
        """x [..., D] (a [B, S, D] hidden state, or [T, D] rows) -> y [..., D_out], aux."""
        lead, D = x.shape[:-1], x.shape[-1]
        x_TD = x.reshape(-1, D)
        if self._fast_inference_applies(x_TD):
            return self._infer(x_TD, lead)
        routing, counted_Tk = self.route(x_TD)
        expert_input, handle = self.dispatcher.dispatch(x_TD, routing)
        y_TD = self.dispatcher.combine(self.experts(expert_input), handle)
        if self.master is not None:
            a = self.blend()
            y_TD = (1 - a) * y_TD + a * self.master(x_TD)
        seq_len = x.shape[-2] if x.dim() >= 3 else x_TD.shape[0]
        return y_TD.reshape(*lead, -1), self.aux(routing, counted_Tk, seq_len)

    def aux(self, routing: Routing, counted_Tk: torch.Tensor, seq_len: int) -> FFFAux:
        logits_TN, probs_TL = routing.stats.logits_TE, routing.stats.probs_TE
        lb = load_balancing_loss(
            probs_TL, counted_Tk, scope=self.balance_scope, seq_len=seq_len, count_sync=self.count_sync
        )
        hardening = decision_entropy(logits_TN).mean()
        with torch.no_grad():
            metrics = {"sharpness": ((torch.sigmoid(logits_TN) - 0.5).abs() >= 0.5 - SHARP_MARGIN).float().mean()}
        counts_L = count_per_expert(counted_Tk, self.num_experts)
        return self._aux(lb, hardening, counts_L, counted_Tk.numel(), metrics)

    def _aux(self, lb, hardening, counts_L: torch.Tensor, total: int, metrics: dict[str, torch.Tensor]) -> FFFAux:
        with torch.no_grad():
            load_L = counts_L.float().div_(max(total, 1))
            metrics["leaf_usage_entropy"] = torch.special.entr(load_L).sum()
            if self.master is not None:
                metrics["master_blend"] = self.blend().detach().float()[0]
        return FFFAux(
            kind="fff",
            objective=self.cfg.balance_coef * lb + self.cfg.hardening_coef * hardening,
            losses={"aux_loss": lb, "hardening_loss": hardening},
            load=load_L,
            metrics=metrics,
        )

    # ---- evaluation: the hard descent without the training path's bookkeeping --------------
    def _fast_inference_applies(self, x_TD: torch.Tensor) -> bool:
        """Evaluation, no gradient, leaves not sharded across ranks: the descent runs as one kernel."""
        weights = [self.tree.node_weight, *self.experts.parameters()]
        return (
            not self.training
            and not torch.is_grad_enabled()
            and isinstance(self.dispatcher, LocalDispatcher)
            and all(local_shard(w) is w for w in weights)
        )

    def _infer(self, x_TD: torch.Tensor, lead: torch.Size) -> tuple[torch.Tensor, FFFAux]:
        y_TD, _, counts_L = fff_hard_forward(x_TD, self.tree, self.experts, backend=self.cfg.inference_backend)
        if self.master is not None:
            a = self.blend()
            y_TD = (1 - a) * y_TD + a * self.master(x_TD)
        return y_TD.reshape(*lead, -1), self._inference_aux(counts_L, x_TD.shape[0])

    def _inference_aux(self, counts_L: torch.Tensor, total: int) -> FFFAux:
        """Evaluation's aux: zero losses (nothing trains) and the leaf usage, in as few tensor ops
        as possible: right after the kernel has streamed the leaf weights through the caches,
        each small op costs tens of microseconds (measured at depth 4, batch 64: ~30 us each)."""
        load_L = counts_L.to(torch.float32).div_(max(total, 1))
        zero = load_L.new_zeros(())
        metrics = {"leaf_usage_entropy": torch.special.entr(load_L).sum()}
        if self.master is not None:
            metrics["master_blend"] = self.blend().detach().float()[0]
        losses = {"aux_loss": zero, "hardening_loss": zero}
        return FFFAux(kind="fff", objective=zero, losses=losses, load=load_L, metrics=metrics)


def leaf_weights(experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(w_in [L, D, H], w_out [L, F, O], swiglu) of SwiGLU or GELU leaves, as the fused kernel takes
    them: SwiGLU's gate and up viewed as one [L, D, 2F] (gate columns first)."""
    if isinstance(experts, SwiGLUExperts):
        return experts.w_gate_up.flatten(2), experts.w_down, True
    return experts.w_in, experts.w_out, False


def fff_hard_forward(
    x_TD: torch.Tensor, tree: TreeRouter, experts: nn.Module, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y [T, O], leaf [T], tokens per leaf [L]) of the hard descent: the fused kernel for
    backend "cpp" (and "auto" where it applies and builds), else `torch_hard_forward`."""
    w_in, w_out, swiglu = leaf_weights(experts)
    fused = fused_hard_forward(
        x_TD, tree.node_weight, tree.node_bias, w_in, w_out, depth=tree.depth, swiglu=swiglu, backend=backend
    )
    return fused if fused is not None else torch_hard_forward(x_TD, tree, experts)


def torch_hard_forward(
    x_TD: torch.Tensor, tree: TreeRouter, experts: nn.Module
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hard descent with the training path's own ops: all node logits, the descent level by
    level, the leaves through the expert kernels over tokens sorted by leaf (bit for bit the
    `hard` training forward)."""
    leaf_T = descend(tree(x_TD), tree.depth)
    order_T = torch.argsort(leaf_T, stable=True)  # the training path's sort of (token, leaf) pairs
    counts_L = count_per_expert(leaf_T, experts.num_experts)
    return experts(ExpertInput(x_TD, order_T, counts_L, None)), leaf_T, counts_L


def fff_reference_forward(layer: FFFLayer, x_TD: torch.Tensor) -> torch.Tensor:
    """The hard FFF output by a loop over tokens and levels with plain tensor ops; for tests."""
    w_ND, b_N = layer.tree.node_weight.detach(), layer.tree.node_bias.detach()
    rows = []
    for x_D in x_TD:
        node = 0
        for _ in range(layer.depth):
            c = float(torch.dot(x_D.float(), w_ND[node].float()) + b_N[node])
            node = 2 * node + (2 if c >= 0 else 1)
        rows.append(layer.experts.expert_forward(node - (2**layer.depth - 1), x_D[None])[0])
    y_TD = torch.stack(rows)
    if layer.master is not None:
        a = layer.blend()
        y_TD = (1 - a) * y_TD + a * layer.master(x_TD)
    return y_TD
