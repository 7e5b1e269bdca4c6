"""Feed-forward blocks: the dense SwiGLU FFN and routed experts stored stacked `[E, ...]`.

Shape legend: T tokens, A routed assignments (sorted by expert), D model width,
F hidden width, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparse_train.kernels import grouped_gemm
from sparse_train.kernels.grouped_gemm import Backend


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases (Llama/Mixtral FFN)."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w_gate = nn.Linear(d_model, hidden, bias=False)
        self.w_up = nn.Linear(d_model, hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class SwiGLUExperts(nn.Module):
    """E SwiGLU experts with stacked weights; computes rows already sorted by expert."""

    def __init__(self, num_experts: int, d_model: int, hidden: int, backend: Backend = "auto") -> None:
        super().__init__()
        self.num_experts = num_experts
        self.backend: Backend = backend
        self.w_gate_EDF = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.w_up_EDF = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.w_down_EFD = nn.Parameter(torch.empty(num_experts, hidden, d_model))

    def forward(self, x_AD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        gate_AF = grouped_gemm(x_AD, self.w_gate_EDF, counts_E, backend=self.backend)
        up_AF = grouped_gemm(x_AD, self.w_up_EDF, counts_E, backend=self.backend)
        return grouped_gemm(F.silu(gate_AF) * up_AF, self.w_down_EFD, counts_E, backend=self.backend)

    def expert_forward(self, e: int, x_nD: torch.Tensor) -> torch.Tensor:
        """One expert on its own rows, with plain matmuls: the per-expert reference."""
        return (F.silu(x_nD @ self.w_gate_EDF[e]) * (x_nD @ self.w_up_EDF[e])) @ self.w_down_EFD[e]
