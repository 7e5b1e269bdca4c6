"""SwiGLU experts over routed rows, with the gather and the weighted scatter fused in.

    y[r] = sum over assignments a with rows[a] == r of  weight[a] * SwiGLU_e(a)(x[r])
    SwiGLU_e(v) = (silu(v @ w_gate[e]) * (v @ w_up[e])) @ w_down[e]

Assignments a are sorted by expert (`counts[e]` of them for expert e); `rows[a]` is the row of
x each one reads and writes (a token id on one device; a received-buffer row under expert
parallelism). Neither a permuted copy of x nor a `[assignments, D]` output is ever stored:
memory that grows with tokens is the three `[assignments, F]` activations the backward needs
(gate, up, and their product), which is what a dense SwiGLU of the same active width keeps.

Backends:
  "torch"      one fused loop over experts (gather rows, 3 matmuls, weighted index_add), and
               a hand-written backward that recomputes nothing expensive; the CPU fast path
  "triton"     the same dataflow as whole-tensor grouped GEMMs with fused gathers (GPU)
  "reference"  per-expert loop with plain autograd; the ground truth in tests
  "auto"       triton on CUDA when installed, torch elsewhere

Both fast backends run through the custom op `sparse_train::swiglu_experts` (fake impl and
registered autograd), so `torch.compile` traces an MoE layer that uses it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparse_train.kernels.grouped_gemm import Backend, autocast_inputs, resolve_backend


# ---- torch: one pass over experts -------------------------------------------------------------
def _forward_torch(x, w_gate, w_up, w_down, rows, counts, weight):
    A, hidden = rows.numel(), w_gate.shape[2]
    gate, up, act = (x.new_empty(A, hidden) for _ in range(3))
    y = torch.zeros_like(x)
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            s = slice(start, start + n)
            idx = rows[s]
            x_e = x.index_select(0, idx)
            torch.mm(x_e, w_gate[e], out=gate[s])
            torch.mm(x_e, w_up[e], out=up[s])
            torch.mul(F.silu(gate[s]), up[s], out=act[s])
            out_e = torch.mm(act[s], w_down[e])
            if weight is not None:
                out_e.mul_(weight[s, None].to(out_e.dtype))
            y.index_add_(0, idx, out_e)
        start += n
    return y, gate, up, act


def _backward_torch(dy, x, w_gate, w_up, w_down, rows, counts, weight, gate, up, act):
    dx = torch.zeros_like(x)
    dw_gate, dw_up, dw_down = torch.zeros_like(w_gate), torch.zeros_like(w_up), torch.zeros_like(w_down)
    dweight = torch.empty_like(weight) if weight is not None else x.new_empty(0)
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            s = slice(start, start + n)
            idx = rows[s]
            dy_e = dy.index_select(0, idx)
            d_act = torch.mm(dy_e, w_down[e].t())  # gradient of the unweighted expert output
            if weight is not None:
                w_e = weight[s, None].to(d_act.dtype)
                torch.sum(d_act.float() * act[s].float(), dim=1, out=dweight[s])
                torch.mm(act[s].t(), dy_e * w_e, out=dw_down[e])
                d_act.mul_(w_e)
            else:
                torch.mm(act[s].t(), dy_e, out=dw_down[e])
            d_gate = torch.ops.aten.silu_backward(d_act * up[s], gate[s])
            d_up = d_act.mul_(F.silu(gate[s]))
            x_e = x.index_select(0, idx)
            torch.mm(x_e.t(), d_gate, out=dw_gate[e])
            torch.mm(x_e.t(), d_up, out=dw_up[e])
            dx.index_add_(0, idx, torch.mm(d_gate, w_gate[e].t()).addmm_(d_up, w_up[e].t()))
        start += n
    return dx, dw_gate, dw_up, dw_down, dweight


# ---- triton: whole-tensor grouped GEMMs with fused gathers -----------------------------------
def _forward_triton(x, w_gate, w_up, w_down, rows, counts, weight):
    from sparse_train.kernels.triton_kernels import grouped_gemm_triton, scatter_add_rows_triton

    gate = grouped_gemm_triton(x, w_gate, counts, x_index=rows)
    up = grouped_gemm_triton(x, w_up, counts, x_index=rows)
    act = F.silu(gate) * up
    out = grouped_gemm_triton(act, w_down, counts)
    return scatter_add_rows_triton(out, rows, x.shape[0], weight), gate, up, act


def _backward_triton(dy, x, w_gate, w_up, w_down, rows, counts, weight, gate, up, act):
    from sparse_train.kernels.triton_kernels import (
        grouped_gemm_dw_triton,
        grouped_gemm_triton,
        scatter_add_rows_triton,
    )

    # Row-space gradients stay fp32 until they feed a GEMM: bf16 inputs then lose no more
    # precision than a bf16 reference does.
    fp32 = torch.float32
    d_act = grouped_gemm_triton(dy, w_down, counts, x_index=rows, trans_w=True, out_dtype=fp32)
    if weight is not None:
        dweight = (d_act * act.float()).sum(dim=1).to(weight.dtype)
        dw_down = grouped_gemm_dw_triton((act.float() * weight[:, None]).to(act.dtype), dy, counts, dy_index=rows)
        d_act = d_act * weight[:, None].float()
    else:
        dweight = x.new_empty(0)
        dw_down = grouped_gemm_dw_triton(act, dy, counts, dy_index=rows)
    gate32 = gate.float()
    d_gate = torch.ops.aten.silu_backward(d_act * up.float(), gate32).to(x.dtype)
    d_up = (d_act * F.silu(gate32)).to(x.dtype)
    dw_gate = grouped_gemm_dw_triton(x, d_gate, counts, x_index=rows)
    dw_up = grouped_gemm_dw_triton(x, d_up, counts, x_index=rows)
    dx_sorted = grouped_gemm_triton(d_gate, w_gate, counts, trans_w=True, out_dtype=fp32)
    dx_sorted += grouped_gemm_triton(d_up, w_up, counts, trans_w=True, out_dtype=fp32)
    dx = scatter_add_rows_triton(dx_sorted, rows, x.shape[0], out_dtype=x.dtype)
    return dx, dw_gate, dw_up, dw_down, dweight


_IMPLS = {"torch": (_forward_torch, _backward_torch), "triton": (_forward_triton, _backward_triton)}


# ---- custom ops -------------------------------------------------------------------------------
@torch.library.custom_op("sparse_train::swiglu_experts", mutates_args=())
def _swiglu_experts_op(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    rows: torch.Tensor,
    counts: torch.Tensor,
    weight: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _IMPLS[backend][0](x, w_gate, w_up, w_down, rows, counts, weight)


@_swiglu_experts_op.register_fake
def _(x, w_gate, w_up, w_down, rows, counts, weight, backend):
    A, hidden = rows.shape[0], w_gate.shape[2]
    return x.new_empty(x.shape), x.new_empty(A, hidden), x.new_empty(A, hidden), x.new_empty(A, hidden)


@torch.library.custom_op("sparse_train::swiglu_experts_backward", mutates_args=())
def _swiglu_experts_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    rows: torch.Tensor,
    counts: torch.Tensor,
    weight: torch.Tensor | None,
    gate: torch.Tensor,
    up: torch.Tensor,
    act: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _IMPLS[backend][1](dy.contiguous(), x, w_gate, w_up, w_down, rows, counts, weight, gate, up, act)


@_swiglu_experts_backward_op.register_fake
def _(dy, x, w_gate, w_up, w_down, rows, counts, weight, gate, up, act, backend):
    dweight = weight.new_empty(weight.shape) if weight is not None else x.new_empty(0)
    return x.new_empty(x.shape), w_gate.new_empty(w_gate.shape), w_up.new_empty(w_up.shape), \
        w_down.new_empty(w_down.shape), dweight  # fmt: skip


def _setup(ctx, inputs, output) -> None:
    x, w_gate, w_up, w_down, rows, counts, weight, backend = inputs
    _, gate, up, act = output
    ctx.save_for_backward(x, w_gate, w_up, w_down, rows, counts, weight, gate, up, act)
    ctx.backend = backend


def _backward(ctx, dy, _d_gate, _d_up, _d_act):
    x, w_gate, w_up, w_down, rows, counts, weight, gate, up, act = ctx.saved_tensors
    dx, dw_gate, dw_up, dw_down, dweight = _swiglu_experts_backward_op(
        dy, x, w_gate, w_up, w_down, rows, counts, weight, gate, up, act, ctx.backend
    )
    return dx, dw_gate, dw_up, dw_down, None, None, (dweight if weight is not None else None), None


_swiglu_experts_op.register_autograd(_backward, setup_context=_setup)


# ---- reference and entry point ----------------------------------------------------------------
def swiglu_experts_reference(x, w_gate, w_up, w_down, rows, counts, weight=None) -> torch.Tensor:
    y = torch.zeros_like(x)
    start = 0
    for e, n in enumerate(counts.tolist()):
        idx = rows[start : start + n]
        x_e = x[idx]
        out_e = (F.silu(x_e @ w_gate[e]) * (x_e @ w_up[e])) @ w_down[e]
        if weight is not None:
            out_e = out_e * weight[start : start + n, None].to(out_e.dtype)
        y = y.index_add(0, idx, out_e)
        start += n
    return y


def swiglu_experts(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    rows: torch.Tensor,
    counts: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Weighted SwiGLU experts over routed rows of x; see the module docstring."""
    if rows.dim() != 1 or counts.dim() != 1 or counts.numel() != w_gate.shape[0]:
        raise ValueError(f"swiglu_experts: rows [A] and counts [E={w_gate.shape[0]}] expected")
    if weight is not None and weight.shape != rows.shape:
        raise ValueError(f"swiglu_experts: weight must be [A={rows.numel()}], got {tuple(weight.shape)}")
    backend = resolve_backend(backend, x.device)
    x, w_gate, w_up, w_down = autocast_inputs(x, w_gate, w_up, w_down)
    with torch.autocast(x.device.type, enabled=False):
        if backend == "reference":
            return swiglu_experts_reference(x, w_gate, w_up, w_down, rows, counts, weight)
        y, *_ = _swiglu_experts_op(x.contiguous(), w_gate, w_up, w_down, rows, counts.to(torch.int64), weight, backend)
        return y
