"""Feed-forward blocks: the dense SwiGLU FFN and routed experts stored stacked `[E, ...]`.

Shape legend: T tokens, A routed assignments (sorted by expert), D model width,
F hidden width, E experts; "2" is the gate/up pair. Parameters are named without it (their
names are checkpoint keys, which must not change when a layout does); their docstrings and
local variables carry the shapes.

Expert weights may be DTensors when the parallel layer shards them (experts over the EP ranks
on dim 0, the hidden width over the TP ranks on the F dim); the compute always runs on the
local shard, which is itself a complete set of (fewer, or narrower) SwiGLU experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from sparse_train.kernels import grouped_gemm, swiglu_experts, unpermute
from sparse_train.kernels.grouped_gemm import Backend
from sparse_train.models.dispatch import ExpertInput


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly DTensor) parameter, differentiably; the tensor itself otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t


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
        # Gate and up in one [E, D, 2, F] tensor: viewed as [E, D, 2F] (gate columns first, as
        # HF's gate_up_proj) each expert is one GEMM; sharding F over TP ranks keeps gate and
        # up columns of the same hidden units together.
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, d_model, 2, hidden))  # [E, D, 2, F]
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden, d_model))  # [E, F, D]

    def forward(self, inp: ExpertInput) -> torch.Tensor:
        """y[r] = sum of weight_a * expert_e(a)(x[r]) over the assignments a that read row r."""
        w_gate_up_ED2F = local_shard(self.w_gate_up).flatten(2)
        return swiglu_experts(
            inp.x,
            w_gate_up_ED2F,
            local_shard(self.w_down),
            inp.rows_A,
            inp.counts_E,
            inp.weight_A,
            backend=self.backend,
        )

    def expert_forward(self, e: int, x_nD: torch.Tensor) -> torch.Tensor:
        """One expert on its own rows, with plain matmuls: the per-expert reference."""
        w_gate_up_D2F = local_shard(self.w_gate_up)[e]
        gate_nF, up_nF = x_nD @ w_gate_up_D2F[:, 0], x_nD @ w_gate_up_D2F[:, 1]
        return (F.silu(gate_nF) * up_nF) @ local_shard(self.w_down)[e]

    def gate_EDF(self) -> torch.Tensor:
        return self.w_gate_up[:, :, 0]

    def up_EDF(self) -> torch.Tensor:
        return self.w_gate_up[:, :, 1]


class GELUExperts(nn.Module):
    """E two-layer GELU FFNs `gelu(x @ w_in[e]) @ w_out[e]` with stacked weights (FFF leaves).

    The output width may differ from the input's (an FFF used as a whole classifier). Computed
    with the grouped GEMM (rows gathered inside it), the routing weight applied to the narrow
    hidden activations, and a weighted scatter-add back (kernels.unpermute).
    """

    def __init__(
        self, num_experts: int, d_model: int, hidden: int, backend: Backend = "auto", d_out: int | None = None
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.backend: Backend = backend
        self.hidden = hidden
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, hidden))  # [E, D, F]
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, d_out or d_model))  # [E, F, D_out]

    def forward(self, inp: ExpertInput) -> torch.Tensor:
        w_in_EDF, w_out_EFD = local_shard(self.w_in), local_shard(self.w_out)
        h_AF = F.gelu(grouped_gemm(inp.x, w_in_EDF, inp.counts_E, x_index=inp.rows_A, backend=self.backend))
        if inp.weight_A is not None:
            h_AF = h_AF * inp.weight_A[:, None].to(h_AF.dtype)
        out_AD = grouped_gemm(h_AF, w_out_EFD, inp.counts_E, backend=self.backend)
        return unpermute(out_AD, inp.rows_A, None, inp.x.shape[0], backend=self.backend)

    def expert_forward(self, e: int, x_nD: torch.Tensor) -> torch.Tensor:
        """One expert on its own rows, with plain matmuls: the per-expert reference."""
        return F.gelu(x_nD @ local_shard(self.w_in)[e]) @ local_shard(self.w_out)[e]


class GELU(nn.Module):
    """out(gelu(inp(x))), no biases: the dense counterpart of a GELU leaf (FFF master leaf)."""

    def __init__(self, d_model: int, hidden: int, d_out: int | None = None) -> None:
        super().__init__()
        self.w_in = nn.Linear(d_model, hidden, bias=False)
        self.w_out = nn.Linear(hidden, d_out or d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(F.gelu(self.w_in(x)))
