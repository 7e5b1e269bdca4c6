"""MoE++'s zero-computation experts: choices of the router beside the FFN experts that cost
(almost) nothing, live on every rank and never enter the dispatcher.

The router picks among `first + zero + copy + constant` choices: FFN experts 0..first-1, then
    zero      output 0 (the token discards this share of the layer),
    copy      output x (it skips the layer for this share),
    constant  output a1 x + a2 v, with a learned vector v and (a1, a2) = softmax(W x) for a
              learned 2 x D matrix W per constant expert (it replaces x by a blend with v).
Each is weighted by its routing weight, like an FFN expert. `ffn_part` is the routing the
dispatcher sees (only FFN assignments selected); `output` adds the others' share, per token.

Shape legend: T tokens, D width, k slots, K constant experts.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from sparse_train.models.routers import Routing

KINDS = ("ffn", "zero", "copy", "constant")


class ZeroComputationExperts(nn.Module):
    def __init__(self, d_model: int, first: int, zero: int, copy: int, constant: int) -> None:
        super().__init__()
        self.first, self.zero, self.copy, self.constant = first, zero, copy, constant
        self.constant_vectors = nn.Parameter(torch.empty(constant, d_model)) if constant else None
        self.constant_gates = nn.Parameter(torch.empty(constant, 2, d_model)) if constant else None

    @property
    def choices(self) -> int:
        return self.first + self.zero + self.copy + self.constant

    def kind_of(self, experts_Tk: torch.Tensor) -> torch.Tensor:
        """0 ffn, 1 zero, 2 copy, 3 constant, per slot (KINDS)."""
        # comparisons with Python ints: no tensor made from host data in the step
        starts = (self.first, self.first + self.zero, self.first + self.zero + self.copy)
        return sum((experts_Tk >= start).long() for start in starts)

    def ffn_part(self, routing: Routing) -> Routing:
        """The routing with only its FFN assignments selected: what the dispatcher moves."""
        is_ffn = routing.experts_Tk < self.first
        selected = is_ffn if routing.selected_Tk is None else is_ffn & routing.selected_Tk
        return replace(routing, experts_Tk=routing.experts_Tk.clamp(max=self.first - 1), selected_Tk=selected)

    def output(self, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        """The copy and constant experts' weighted outputs, summed per token ([T, D], x's dtype)."""
        active = routing.active_Tk
        weights_Tk = routing.weights_Tk if active is None else routing.weights_Tk * active
        kind_Tk = self.kind_of(routing.experts_Tk)
        copy_T = (weights_Tk * (kind_Tk == 2)).sum(dim=-1)
        y_TD = copy_T[:, None] * x_TD.float()
        if self.constant:
            assert self.constant_vectors is not None and self.constant_gates is not None
            constant_Tk = routing.experts_Tk - (self.first + self.zero + self.copy)
            is_constant = kind_Tk == 3
            weights_TK = torch.zeros(x_TD.shape[0], self.constant, device=x_TD.device)
            weights_TK = weights_TK.scatter_add(1, constant_Tk.clamp(min=0) * is_constant, weights_Tk * is_constant)
            alpha_TK2 = torch.einsum("td,kcd->tkc", x_TD.float(), self.constant_gates.float()).softmax(dim=-1)
            blend_TKD = alpha_TK2[..., :1] * x_TD.float()[:, None] + alpha_TK2[..., 1:] * self.constant_vectors.float()
            y_TD = y_TD + torch.einsum("tk,tkd->td", weights_TK, blend_TKD)
        return y_TD.to(x_TD.dtype)

    def kind_fractions(self, routing: Routing) -> dict[str, torch.Tensor]:
        """The share of the layer's assignments (after drops) taken by each kind (metrics)."""
        active = routing.active_Tk
        kind_Tk = self.kind_of(routing.experts_Tk)
        counted = torch.ones_like(kind_Tk, dtype=torch.float32) if active is None else active.float()
        total = counted.sum().clamp_min(1.0)
        return {f"{kind}_fraction": (counted * (kind_Tk == i)).sum() / total for i, kind in enumerate(KINDS)}
