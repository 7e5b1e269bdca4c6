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

from collections.abc import Callable
from typing import Literal

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
    """E gated experts with stacked weights, computed over routed rows.

    activation "swiglu": silu(gate) * up (Mixtral, DeepSeek); "gpt_oss": (up + 1) * g * sigmoid(alpha g)
    with g = min(gate, limit) and up clamped to [-limit, limit] (gpt-oss). With `bias` (gpt-oss)
    each expert adds `b_gate_up[e]` to its gate/up projection and `b_down[e]` to its output.

    The plain swiglu experts without biases run the fused kernels.swiglu_experts; any other
    combination runs two grouped GEMMs around the activation (`_grouped_forward`).

    Expert tensor parallelism (each expert's hidden units split over the TP ranks) is installed
    from outside through two seams, identities on one device: `enter_tp` (Megatron's f: the
    gradients of the rows and routing weights are summed over the TP ranks) and `sum_tp` (g:
    the routed outputs, partial sums over the TP ranks, summed). The down bias is added after
    `sum_tp`, with the routing weights as they were before `enter_tp`: every TP rank adds the
    same whole bias once, and its routing-weight gradient is not summed over the TP ranks.
    Everything happens inside `forward`, where FSDP has the parameters unsharded.
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        hidden: int,
        backend: Backend = "auto",
        *,
        activation: Literal["swiglu", "gpt_oss"] = "swiglu",
        alpha: float = 1.702,
        limit: float = 7.0,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if activation not in ("swiglu", "gpt_oss"):
            raise ValueError(f"unknown expert activation {activation!r}; allowed: swiglu, gpt_oss")
        self.num_experts = num_experts
        self.backend: Backend = backend
        self.hidden = hidden
        self.activation = activation
        self.alpha, self.limit = alpha, limit
        # Gate and up in one [E, D, 2, F] tensor: viewed as [E, D, 2F] (gate columns first; HF's
        # gate_up_proj is interleaved instead) each expert is one GEMM; sharding F over TP ranks
        # keeps gate and up columns of the same hidden units together.
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, d_model, 2, hidden))  # [E, D, 2, F]
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden, d_model))  # [E, F, D]
        self.b_gate_up: nn.Parameter | None = None
        self.b_down: nn.Parameter | None = None
        if bias:
            # [E, 2, F]: the gate/up layout of w_gate_up without D, so F shards with it over TP
            self.b_gate_up = nn.Parameter(torch.zeros(num_experts, 2, hidden))
            # [E, D]: sharded over EP with the experts, whole on every TP rank (_add_down_bias)
            self.b_down = nn.Parameter(torch.zeros(num_experts, d_model))

        self.enter_tp: Callable[[ExpertInput], ExpertInput] = _same
        self.sum_tp: Callable[[torch.Tensor], torch.Tensor] = _same

    @property
    def fused(self) -> bool:
        """Whether forward runs the fused SwiGLU kernel (plain swiglu, no biases)."""
        return self.activation == "swiglu" and self.b_gate_up is None

    def bias_parameters(self) -> list[nn.Parameter]:
        """The stacked biases (exempt from weight decay like any bias: sparse_train.train.optim)."""
        return [b for b in (self.b_gate_up, self.b_down) if b is not None]

    def forward(self, inp: ExpertInput) -> torch.Tensor:
        """y[r] = sum of weight_a * expert_e(a)(x[r]) over the assignments a that read row r."""
        y_RD = self.sum_tp(self._routed(self.enter_tp(inp)))
        return self._add_down_bias(y_RD, inp)

    def _routed(self, inp: ExpertInput) -> torch.Tensor:
        """The weighted expert outputs without the down bias (on this rank's hidden units)."""
        if not self.fused:
            return self._grouped_forward(inp)
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

    def _grouped_forward(self, inp: ExpertInput) -> torch.Tensor:
        """Grouped GEMM (rows gathered inside it), + gate/up bias, activation, routing weight on the
        narrow hidden activations, grouped GEMM, weighted scatter-add back onto the rows."""
        w_gate_up_ED2F = local_shard(self.w_gate_up).flatten(2)  # gate columns, then up columns
        h_A2F = grouped_gemm(inp.x, w_gate_up_ED2F, inp.counts_E, x_index=inp.rows_A, backend=self.backend)
        if self.b_gate_up is not None:
            b_gate_up_E2F = local_shard(self.b_gate_up).flatten(1)
            h_A2F = h_A2F + b_gate_up_E2F.index_select(0, expert_of_assignment(inp)).to(h_A2F.dtype)
        gate_AF, up_AF = h_A2F.chunk(2, dim=-1)
        act_AF = self.activate(gate_AF, up_AF)
        if inp.weight_A is not None:
            act_AF = act_AF * inp.weight_A[:, None].to(act_AF.dtype)
        out_AD = grouped_gemm(act_AF, local_shard(self.w_down), inp.counts_E, backend=self.backend)
        return unpermute(out_AD, inp.rows_A, None, inp.x.shape[0], backend=self.backend)

    def activate(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """The gated activation of matching gate and up pre-activations."""
        if self.activation == "swiglu":
            return F.silu(gate) * up
        # gpt-oss clamps gate only from above: sigmoid already flattens large negative gates
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * gate * torch.sigmoid(self.alpha * gate)

    def _add_down_bias(self, y_RD: torch.Tensor, inp: ExpertInput) -> torch.Tensor:
        """y[r] + sum of weight_a * b_down[e(a)] over the assignments a that read row r: each
        assignment's expert output carries its expert's bias, weighted like the rest of it.
        After sum_tp (see the class docstring); under EP it runs where the experts live (b_down
        sharded with them on dim 0), on the rows they received, before the dispatcher's combine."""
        if self.b_down is None:
            return y_RD
        bias_AD = local_shard(self.b_down).index_select(0, expert_of_assignment(inp)).to(y_RD.dtype)
        return y_RD + unpermute(bias_AD, inp.rows_A, inp.weight_A, y_RD.shape[0], backend=self.backend)

    def expert_forward(self, e: int, x_nD: torch.Tensor) -> torch.Tensor:
        """One expert on its own rows, with plain matmuls, biases included: the per-expert reference."""
        w_gate_up_D2F = local_shard(self.w_gate_up)[e]
        gate_nF, up_nF = x_nD @ w_gate_up_D2F[:, 0], x_nD @ w_gate_up_D2F[:, 1]
        if self.b_gate_up is not None:
            b_gate_up_2F = local_shard(self.b_gate_up)[e]
            gate_nF, up_nF = gate_nF + b_gate_up_2F[0], up_nF + b_gate_up_2F[1]
        out_nD = self.activate(gate_nF, up_nF) @ local_shard(self.w_down)[e]
        if self.b_down is not None:
            out_nD = out_nD + local_shard(self.b_down)[e]
        return out_nD

    def gate_EDF(self) -> torch.Tensor:
        return self.w_gate_up[:, :, 0]

    def up_EDF(self) -> torch.Tensor:
        return self.w_gate_up[:, :, 1]


def _same(t):
    return t


def expert_of_assignment(inp: ExpertInput) -> torch.Tensor:
    """The (local) expert of each assignment, [A] int64: assignments are sorted by expert, so expert
    e repeats counts_E[e] times. output_size is known from the shapes: no host sync."""
    counts_E = inp.counts_E
    experts_E = torch.arange(counts_E.shape[0], device=counts_E.device)
    return torch.repeat_interleave(experts_E, counts_E, output_size=inp.rows_A.shape[0])


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
