"""The single-device token dispatcher: the second seam of an MoE layer.

`dispatch` gathers every kept (token, slot) assignment into expert order; `combine` scatters
the expert outputs back to their tokens, weighted by the routing weights. The parallel
dispatchers (sparse_train.parallel.dispatch) have the same interface and move tokens between
ranks in between.

Shape legend: T tokens, D model width, E experts, k slots per token, A kept assignments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparse_train.models.routers import Routing


@dataclass
class DispatchHandle:
    token_A: torch.Tensor  # source token of each sorted assignment
    weights_A: torch.Tensor  # routing weight of each sorted assignment (fp32)
    num_tokens: int


class LocalDispatcher:
    """Sort assignments by expert with one stable argsort; no per-token Python work."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, DispatchHandle]:
        T, k = routing.experts_Tk.shape
        experts_A = routing.experts_Tk.reshape(-1)
        weights_A = routing.weights_Tk.reshape(-1)
        token_A = torch.arange(T, device=x_TD.device).repeat_interleave(k)
        if routing.kept_Tk is not None:
            kept_A = routing.kept_Tk.reshape(-1)
            experts_A, weights_A, token_A = experts_A[kept_A], weights_A[kept_A], token_A[kept_A]
        order_A = torch.argsort(experts_A, stable=True)
        token_A, weights_A = token_A[order_A], weights_A[order_A]
        counts_E = torch.bincount(experts_A, minlength=self.num_experts)
        return x_TD.index_select(0, token_A), counts_E, DispatchHandle(token_A, weights_A, T)

    def combine(self, y_AD: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        weighted_AD = y_AD * handle.weights_A.to(y_AD.dtype)[:, None]
        y_TD = y_AD.new_zeros(handle.num_tokens, y_AD.shape[1])
        return y_TD.index_add(0, handle.token_A, weighted_AD)
