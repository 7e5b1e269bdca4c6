"""Feed-forward blocks: the dense SwiGLU FFN and routed experts stored stacked `[E, ...]`.

Shape legend: T tokens, A routed assignments (sorted by expert), D model width,
F hidden width, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparse_train.kernels import swiglu_experts
from sparse_train.kernels.grouped_gemm import Backend
from sparse_train.models.dispatch import ExpertInput


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
    """E SwiGLU experts with stacked weights, computed over routed rows (kernels.swiglu_experts)."""

    def __init__(self, num_experts: int, d_model: int, hidden: int, backend: Backend = "auto") -> None:
        super().__init__()
        self.num_experts = num_experts
        self.backend: Backend = backend
        self.hidden = hidden
        # gate and up in one [E, D, 2F] tensor (gate columns first, as HF's gate_up_proj): one GEMM
        self.w_gate_up_ED2F = nn.Parameter(torch.empty(num_experts, d_model, 2 * hidden))
        self.w_down_EFD = nn.Parameter(torch.empty(num_experts, hidden, d_model))

    def forward(self, inp: ExpertInput) -> torch.Tensor:
        """y[r] = sum of weight_a * expert_e(a)(x[r]) over the assignments a that read row r."""
        return swiglu_experts(
            inp.x, self.w_gate_up_ED2F, self.w_down_EFD, inp.rows_A, inp.counts_E, inp.weight_A,
            backend=self.backend,
        )  # fmt: skip

    def expert_forward(self, e: int, x_nD: torch.Tensor) -> torch.Tensor:
        """One expert on its own rows, with plain matmuls: the per-expert reference."""
        gate_nF, up_nF = (x_nD @ self.w_gate_up_ED2F[e]).split(self.hidden, dim=-1)
        return (F.silu(gate_nF) * up_nF) @ self.w_down_EFD[e]

    def gate_EDF(self) -> torch.Tensor:
        return self.w_gate_up_ED2F[:, :, : self.hidden]

    def up_EDF(self) -> torch.Tensor:
        return self.w_gate_up_ED2F[:, :, self.hidden :]
