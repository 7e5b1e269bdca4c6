"""Token dispatchers: the second seam of an MoE layer.

`dispatch(x, routing)` turns the routing into an `ExpertInput`: the rows the experts read, which
row each (token, slot) assignment uses, sorted by expert, and the weight the experts apply when
they scatter their outputs back. `combine(y, handle)` brings the expert outputs home.

On one device nothing moves: the experts gather the rows they need and scatter-add their
weighted outputs straight into a `[T, D]` tensor (sparse_train.kernels.swiglu_experts), so
`combine` is the identity and no permuted copy of the tokens is ever made. The parallel
dispatchers (sparse_train.parallel.dispatch) move rows between ranks inside dispatch/combine
and keep the same interface.

Shape legend: T tokens, D model width, E experts, k slots per token, A kept assignments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparse_train.kernels import count_per_expert
from sparse_train.models.routers import Routing


@dataclass
class ExpertInput:
    x: torch.Tensor  # [R, D] rows the experts read and write
    rows_A: torch.Tensor  # int64 row of x per assignment, sorted by expert
    counts_E: torch.Tensor  # int64 assignments per (local) expert
    weight_A: torch.Tensor | None  # combine weight per assignment, or None when combine applies it


def sort_assignments(routing: Routing) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(expert, token, weight) of every kept assignment, sorted by expert with a stable sort."""
    T, k = routing.experts_Tk.shape
    experts_A = routing.experts_Tk.reshape(-1)
    weights_A = routing.weights_Tk.reshape(-1)
    assignment_A = torch.arange(T * k, device=experts_A.device)
    if routing.active_Tk is not None:
        kept_A = routing.active_Tk.reshape(-1)
        experts_A, weights_A, assignment_A = experts_A[kept_A], weights_A[kept_A], assignment_A[kept_A]
    order_A = torch.argsort(experts_A, stable=True)
    return experts_A[order_A], assignment_A[order_A] // k, weights_A[order_A], order_A


class LocalDispatcher:
    """Single device: sort the assignments by expert; the experts gather and scatter in place."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> tuple[ExpertInput, None]:
        experts_A, token_A, weight_A, _ = sort_assignments(routing)
        counts_E = count_per_expert(experts_A, self.num_experts)
        return ExpertInput(x_TD, token_A, counts_E, weight_A), None

    def combine(self, y_TD: torch.Tensor, handle: None) -> torch.Tensor:
        return y_TD
