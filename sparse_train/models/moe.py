"""The MoE layer, composed from four seams: router -> dispatcher -> experts -> combine, + losses.

Shape legend: B batch, S sequence, T = B*S tokens, D model width, E experts, k slots.
"""

from __future__ import annotations

import torch
from torch import nn

from sparse_train.config import MoEConfig, RouterConfig
from sparse_train.models.experts import SwiGLU, SwiGLUExperts
from sparse_train.models.losses import expert_counts, load_balancing_loss, router_entropy, router_z_loss
from sparse_train.models.recompute import recomputing
from sparse_train.models.routers import (
    Routing,
    TopKRouter,
    apply_capacity,
    chunk_sparsity,
    chunk_sparsity_loss,
    token_sparsity,
    token_sparsity_loss,
)
from sparse_train.models.sparse import SparseAux, SparseFFN
from sparse_train.models.zero_experts import ZeroComputationExperts


class MoEAux(SparseAux):
    """The MoE layer's SparseAux, with its parts by name."""

    @classmethod
    def build(
        cls,
        lb_loss,
        z_loss,
        expert_load_E,
        dropped_fraction,
        router_entropy,
        router: RouterConfig,
        extra_metrics: dict[str, torch.Tensor] | None = None,
        extra_objective: torch.Tensor | float = 0.0,
    ) -> MoEAux:
        return cls(
            kind="moe",
            objective=router.aux_loss_coef * lb_loss + router.z_loss_coef * z_loss + extra_objective,
            losses={"aux_loss": lb_loss, "z_loss": z_loss},
            load=expert_load_E,  # fraction of assignments per expert, before capacity drops
            metrics={"dropped_fraction": dropped_fraction, "router_entropy": router_entropy, **(extra_metrics or {})},
        )

    @property
    def lb_loss(self) -> torch.Tensor:
        return self.losses["aux_loss"]

    @property
    def z_loss(self) -> torch.Tensor:
        return self.losses["z_loss"]

    @property
    def expert_load_E(self) -> torch.Tensor:
        return self.load

    @property
    def dropped_fraction(self) -> torch.Tensor:
        return self.metrics["dropped_fraction"]

    @property
    def router_entropy(self) -> torch.Tensor:
        return self.metrics["router_entropy"]


class MoELayer(SparseFFN):
    kind = "moe"

    def __init__(self, d_model: int, moe: MoEConfig, router: RouterConfig, *, follows_moe: bool = False) -> None:
        """`follows_moe`: an MoE layer comes before this one (its logits feed moe.gating_residual)."""
        super().__init__()
        self._init_seams(moe.num_experts, router.balance_scope)
        self.router_cfg = router
        self.capacity_factor = moe.capacity_factor
        self.drop_policy = moe.drop_policy
        # MoE++: the router also chooses among zero-computation experts, computed here on every rank
        zero_computation = ZeroComputationExperts(
            d_model, moe.num_experts, moe.zero_experts, moe.copy_experts, moe.constant_experts
        )
        self.zero_computation = zero_computation if zero_computation.choices > moe.num_experts else None
        self.num_choices = zero_computation.choices  # the router's: FFN experts, then zero-computation ones
        self.router = TopKRouter(d_model, self.num_choices, router, moe.capacity_factor)
        # MoE++ gating residual: the previous MoE layer's logits, projected, join this router's
        self.passes_logits = moe.gating_residual
        self.gating_residual = (
            nn.Linear(self.num_choices, self.num_choices, bias=False) if moe.gating_residual and follows_moe else None
        )
        self.experts = SwiGLUExperts(
            moe.num_experts,
            d_model,
            moe.expert_hidden,
            moe.kernel_backend,
            activation=moe.expert_activation,
            alpha=moe.expert_alpha,
            limit=moe.expert_limit,
            bias=moe.expert_bias,
        )
        shared_hidden = moe.num_shared_experts * (moe.shared_expert_hidden or moe.expert_hidden)
        self.shared_experts = SwiGLU(d_model, shared_hidden) if shared_hidden else None
        self.shared_gate = nn.Linear(d_model, 1, bias=False) if moe.shared_expert_gate else None
        self.bias_counts_E: torch.Tensor | None = None  # this step's selections, for the aux-free bias

    def route(
        self, x_TD: torch.Tensor, seq_len: int | None = None, previous_logits_TE: torch.Tensor | None = None
    ) -> Routing:
        """`seq_len`: tokens per sequence in x_TD (None: one sequence), for the routers that need it;
        `previous_logits_TE`: the previous MoE layer's router logits (moe.gating_residual)."""
        residual_TE = None
        if self.gating_residual is not None and previous_logits_TE is not None:
            residual_TE = self.gating_residual(previous_logits_TE.float())
        routing = self.router(x_TD, seq_len, residual_TE)
        if self.training and self.router.expert_bias_E is not None:
            self._count_for_bias(routing.experts_Tk)
        # expert_choice's capacity is its own (per sequence); relu has none (config validation)
        if self.capacity_factor is not None and routing.selected_Tk is None:
            routing = apply_capacity(routing, self.num_choices, self.capacity_factor, self.drop_policy)
        return routing

    def ffn_routing(self, routing: Routing) -> Routing:
        """The part of `routing` the FFN experts compute (all of it without zero-computation experts)."""
        return routing if self.zero_computation is None else self.zero_computation.ffn_part(routing)

    def forward(
        self, x_BSD: torch.Tensor, previous_logits_TE: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, MoEAux]:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        routing = self.route(x_TD, S, previous_logits_TE)
        expert_input, handle = self.dispatcher.dispatch(x_TD, self.ffn_routing(routing))
        y_TD = self.dispatcher.combine(self.experts(expert_input), handle)
        if self.zero_computation is not None:
            y_TD = y_TD + self.zero_computation.output(x_TD, routing)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_output(x_TD)
        aux = self.aux(routing, seq_len=S)
        if self.passes_logits:
            aux.carry = routing.stats.logits_TE
        return y_TD.reshape(B, S, D), aux

    # ---- aux-loss-free balancing (router.bias_update_rate) ---------------------------------
    def _count_for_bias(self, experts_Tk: torch.Tensor) -> None:
        """Add this micro-batch's selections per expert to the step's counts (on the device);
        once, not again when a checkpointed block recomputes its forward."""
        if recomputing():
            return
        counts_E = expert_counts(experts_Tk, self.num_choices).float()
        self.bias_counts_E = counts_E if self.bias_counts_E is None else self.bias_counts_E + counts_E

    def take_bias_counts(self) -> torch.Tensor:
        """The step's selections per expert on this rank (zeros if none), and a fresh start."""
        counts_E, self.bias_counts_E = self.bias_counts_E, None
        if counts_E is None:
            return torch.zeros(self.num_choices, device=self.router.weight.device)
        return counts_E

    @torch.no_grad()
    def update_expert_bias(self, counts_E: torch.Tensor, skipped: torch.Tensor | None = None) -> None:
        """bias += rate * sign(mean load - load) for the step's global counts (Wang et al. 2024,
        DeepSeek-V3): under-loaded experts become likelier to be picked. Not on a skipped step."""
        delta_E = self.router_cfg.bias_update_rate * torch.sign(counts_E.mean() - counts_E)
        if skipped is not None:
            delta_E = torch.where(skipped, torch.zeros_like(delta_E), delta_E)
        self.router.expert_bias_E += delta_E

    def shared_output(self, x_TD: torch.Tensor) -> torch.Tensor:
        shared_TD = self.shared_experts(x_TD)
        if self.shared_gate is not None:
            shared_TD = torch.sigmoid(self.shared_gate(x_TD)) * shared_TD
        return shared_TD

    def aux(self, routing: Routing, seq_len: int) -> MoEAux:
        stats, selected = routing.stats, routing.selected_Tk
        lb = load_balancing_loss(
            stats.probs_TE,
            routing.experts_Tk,
            scope=self.balance_scope,
            seq_len=seq_len,
            count_sync=self.count_sync,
            selected_Tk=selected,
        )
        with torch.no_grad():
            load_E = expert_counts(routing.experts_Tk, self.num_choices, selected)  # every choice, kinds too
            load_E = load_E / load_E.sum().clamp_min(1.0)
            kept, active = routing.kept_Tk, self.ffn_routing(routing).active_Tk
            dropped = load_E.new_zeros(()) if kept is None else 1.0 - kept.float().mean()
            # FFN experts that compute for a token, after drops (top_k when dropless)
            per_token = load_E.new_full((), routing.top_k) if active is None else active.float().sum(-1).mean()
            extra = {"experts_per_token": per_token}
            if self.zero_computation is not None:
                extra.update(self.zero_computation.kind_fractions(routing))
            if (bias_E := self.router.expert_bias_E) is not None:
                extra["expert_bias_range"] = (bias_E.max() - bias_E.min()).float()
            if self.router_cfg.type == "relu":
                extra["token_sparsity"] = token_sparsity(selected)
                extra["chunk_sparsity"] = chunk_sparsity(selected, seq_len, self.router_cfg.chunk_size)
        z = router_z_loss(stats.logits_TE)
        objective = self._sparsity_objective(stats.logits_TE, seq_len)
        return MoEAux.build(lb, z, load_E, dropped, router_entropy(stats.probs_TE), self.router_cfg, extra, objective)

    def _sparsity_objective(self, logits_TE: torch.Tensor, seq_len: int) -> torch.Tensor | float:
        """The relu router's TLS and CLS objectives, weighted (BlockFFN); zero for other routers."""
        cfg, objective = self.router_cfg, 0.0
        if cfg.tls_coef:
            objective = objective + cfg.tls_coef * token_sparsity_loss(logits_TE, logits_TE.shape[-1])
        if cfg.cls_coef:
            objective = objective + cfg.cls_coef * chunk_sparsity_loss(logits_TE, seq_len, cfg.chunk_size)
        return objective


def moe_reference_forward(
    layer: MoELayer, x_BSD: torch.Tensor, previous_logits_TE: torch.Tensor | None = None
) -> torch.Tensor:
    """The MoE layer's output by a per-expert loop over the tokens that chose it; for tests."""
    B, S, D = x_BSD.shape
    x_TD = x_BSD.reshape(B * S, D)
    full_routing = layer.route(x_TD, S, previous_logits_TE)
    routing = layer.ffn_routing(full_routing)
    active = routing.active_Tk
    kept_Tk = active if active is not None else torch.ones_like(routing.experts_Tk, dtype=torch.bool)
    y_TD = torch.zeros_like(x_TD)
    for e in range(layer.num_experts):
        token_n, slot_n = torch.nonzero((routing.experts_Tk == e) & kept_Tk, as_tuple=True)
        if token_n.numel() == 0:
            continue
        out_nD = layer.experts.expert_forward(e, x_TD[token_n])
        y_TD = y_TD.index_add(0, token_n, out_nD * routing.weights_Tk[token_n, slot_n, None].to(x_TD.dtype))
    if layer.zero_computation is not None:
        y_TD = y_TD + layer.zero_computation.output(x_TD, full_routing)
    if layer.shared_experts is not None:
        y_TD = y_TD + layer.shared_output(x_TD)
    return y_TD.reshape(B, S, D)
