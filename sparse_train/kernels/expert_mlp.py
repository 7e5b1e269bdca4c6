"""SwiGLU experts over routed rows, with the gather and the weighted scatter fused in.

    y[r] = sum over assignments a with rows[a] == r of  weight[a] * SwiGLU_e(a)(x[r])
    SwiGLU_e(v) = (silu(v @ W_gate[e]) * (v @ W_up[e])) @ w_down[e]
    w_gate_up[e] = [W_gate[e] | W_up[e]]   ([D, 2F]: gate columns first, as HF's gate_up_proj)

Gate and up are one `[D, 2F]` matrix so each expert runs one wider GEMM instead of two
narrow ones (on 2 CPU cores N=256 runs ~1.4x the FLOP rate of N=128), and the backward's
dX and dW for both are one GEMM each.

Assignments a are sorted by expert (`counts[e]` of them for expert e); `rows[a]` is the row of
x each one reads and writes (a token id on one device; a received-buffer row under expert
parallelism). Neither a permuted copy of x nor a `[assignments, D]` output is ever stored:
what grows with tokens is the `[assignments, 2F]` gate/up activations and the `[assignments,
F]` product the backward needs, which is what a dense SwiGLU of the same active width keeps.

Backends:
  "torch"      one fused loop over experts (gather rows, 2 GEMMs, weighted index_add), and a
               hand-written backward that recomputes nothing expensive; the CPU fast path
  "triton"     the same dataflow as whole-tensor grouped GEMMs with fused gathers (GPU)
  "grouped_mm" the triton dataflow with torch._grouped_mm for the GEMMs and index ops for the
               gathers and the scatter (see kernels.grouped_gemm for where it runs)
  "reference"  per-expert loop with plain autograd; the ground truth in tests
  "auto"       triton on CUDA when installed, torch elsewhere

The fast backends run through the custom op `sparse_train::swiglu_experts` (fake impl and
registered autograd), so `torch.compile` traces an MoE layer that uses it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparse_train.kernels.cpu_parallel import balanced_parts, expert_workers, run_parts
from sparse_train.kernels.grouped_gemm import (
    Backend,
    autocast_inputs,
    check_grouped_mm_operands,
    gmm_dw_grouped_mm,
    gmm_grouped_mm,
    resolve_backend,
)


def _swiglu_grads(
    d_act: torch.Tensor, gate_up: torch.Tensor, silu: torch.Tensor, out: torch.Tensor, tmp: torch.Tensor
) -> torch.Tensor:
    """d(gate_up) of act = silu(gate) * up, written into `out` ([n, 2F]); `tmp` is [n, F] scratch."""
    hidden = gate_up.shape[1] // 2
    gate, up = gate_up[:, :hidden], gate_up[:, hidden:]
    torch.ops.aten.silu_backward.grad_input(torch.mul(d_act, up, out=tmp), gate, grad_input=out[:, :hidden])
    torch.mul(d_act, silu, out=out[:, hidden:])
    return out


# ---- torch: one pass over experts -------------------------------------------------------------
# Per-expert temporaries live in one workspace sized for the largest expert and reused by every
# expert: fresh multi-MB allocations per expert would each be a new mmap with page faults to
# zero it (measured: ~15% of the fine-grained layer's time on 2 cores), and reused buffers stay
# warm in cache. With several CPU threads the experts are split into groups of about equal
# rows that run concurrently, one thread each (kernels.cpu_parallel); each group scatter-adds
# into its own buffer, and the buffers are summed in group order, so results are deterministic.
def _workspace(x: torch.Tensor, counts_list: list[int], widths: dict[str, int]) -> dict[str, torch.Tensor]:
    rows = max(counts_list, default=0)
    return {name: x.new_empty(rows, width) for name, width in widths.items()}


def _starts(counts_list: list[int]) -> list[int]:
    starts, total = [], 0
    for n in counts_list:
        starts.append(total)
        total += n
    return starts


def _sum_parts(parts: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    if not parts:
        return torch.zeros_like(like)
    for other in parts[1:]:
        parts[0].add_(other)
    return parts[0]


def _forward_torch(x, w_gate_up, w_down, rows, counts, weight):
    A, hidden, D = rows.numel(), w_down.shape[1], x.shape[1]
    gate_up, silu, act = x.new_empty(A, 2 * hidden), x.new_empty(A, hidden), x.new_empty(A, hidden)
    counts_list = counts.tolist()
    starts = _starts(counts_list)
    weight_act = weight is not None and hidden < D  # weight the narrower of act [n, F] and out [n, D]
    workers = expert_workers(x.device)
    parts = balanced_parts(counts_list, workers)
    # Buffers are allocated here, in the calling thread: its allocator keeps freed memory warm.
    outputs = [torch.zeros_like(x) for _ in parts]
    spaces = [_workspace(x, [counts_list[e] for e in p], {"x": D, "out": D, "act_w": hidden}) for p in parts]

    def run(part: int, experts: list[int]) -> torch.Tensor:
        y, ws = outputs[part], spaces[part]
        for e in experts:
            n = counts_list[e]
            s = slice(starts[e], starts[e] + n)
            idx = rows[s]
            x_e = torch.index_select(x, 0, idx, out=ws["x"][:n])
            gu = torch.mm(x_e, w_gate_up[e], out=gate_up[s])
            torch.mul(torch.ops.aten.silu.out(gu[:, :hidden], out=silu[s]), gu[:, hidden:], out=act[s])
            if weight_act:
                act_w = torch.mul(act[s], weight[s, None].to(act.dtype), out=ws["act_w"][:n])
                out_e = torch.mm(act_w, w_down[e], out=ws["out"][:n])
            else:
                out_e = torch.mm(act[s], w_down[e], out=ws["out"][:n])
                if weight is not None:
                    out_e.mul_(weight[s, None].to(out_e.dtype))
            y.index_add_(0, idx, out_e)
        return y

    y = _sum_parts(run_parts(run, parts, workers), x)
    return y, gate_up, silu, act


def _backward_torch(dy, x, w_gate_up, w_down, rows, counts, weight, gate_up, silu, act, need_dx):
    hidden, D = w_down.shape[1], x.shape[1]
    dw_gate_up, dw_down = torch.empty_like(w_gate_up), torch.empty_like(w_down)
    dweight = torch.empty_like(weight) if weight is not None else x.new_empty(0)
    counts_list = counts.tolist()
    starts = _starts(counts_list)
    for e, n in enumerate(counts_list):
        if not n:  # experts that received nothing have zero weight gradients
            dw_gate_up[e].zero_()
            dw_down[e].zero_()

    workers = expert_workers(x.device)
    parts = balanced_parts(counts_list, workers)
    widths = {"dy": D, "x": D, "d_act": hidden, "d_gate_up": 2 * hidden, "tmp": hidden, "dx": D}
    outputs = [torch.zeros_like(x) if need_dx else x.new_empty(0) for _ in parts]
    spaces = [_workspace(x, [counts_list[e] for e in p], widths) for p in parts]

    def run(part: int, experts: list[int]) -> torch.Tensor:
        dx, ws = outputs[part], spaces[part]
        for e in experts:
            n = counts_list[e]
            s = slice(starts[e], starts[e] + n)
            idx = rows[s]
            dy_e = torch.index_select(dy, 0, idx, out=ws["dy"][:n])
            d_act = torch.mm(dy_e, w_down[e].t(), out=ws["d_act"][:n])  # gradient of the unweighted output
            if weight is not None:
                w_e = weight[s, None].to(d_act.dtype)
                dweight[s] = torch.linalg.vecdot(d_act, act[s])  # one read pass, no [n, F] temporary
                if hidden < D:  # dW_down = (w * act)^T dy, weighting the narrower operand
                    torch.mm(torch.mul(act[s], w_e, out=ws["tmp"][:n]).t(), dy_e, out=dw_down[e])
                else:
                    torch.mm(act[s].t(), dy_e.mul_(w_e), out=dw_down[e])
                d_act.mul_(w_e)
            else:
                torch.mm(act[s].t(), dy_e, out=dw_down[e])
            d_gate_up = _swiglu_grads(d_act, gate_up[s], silu[s], ws["d_gate_up"][:n], ws["tmp"][:n])
            x_e = torch.index_select(x, 0, idx, out=ws["x"][:n])
            torch.mm(x_e.t(), d_gate_up, out=dw_gate_up[e])
            if need_dx:
                dx.index_add_(0, idx, torch.mm(d_gate_up, w_gate_up[e].t(), out=ws["dx"][:n]))
        return dx

    dx_parts = run_parts(run, parts, workers)
    dx = _sum_parts(dx_parts, x) if need_dx else x.new_empty(0)
    return dx, dw_gate_up, dw_down, dweight


# ---- triton: whole-tensor grouped GEMMs with fused gathers -----------------------------------
def _forward_triton(x, w_gate_up, w_down, rows, counts, weight):
    from sparse_train.kernels.triton_kernels import grouped_gemm_triton, scatter_add_rows_triton

    hidden = w_down.shape[1]
    gate_up = grouped_gemm_triton(x, w_gate_up, counts, x_index=rows)
    silu = F.silu(gate_up[:, :hidden])
    act = silu * gate_up[:, hidden:]
    out = grouped_gemm_triton(act, w_down, counts)
    return scatter_add_rows_triton(out, rows, x.shape[0], weight), gate_up, silu, act


def _backward_triton(dy, x, w_gate_up, w_down, rows, counts, weight, gate_up, silu, act, need_dx):
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
    d_gate_up = _swiglu_grads(
        d_act, gate_up.float(), silu.float(), d_act.new_empty(gate_up.shape), torch.empty_like(d_act)
    )
    d_gate_up = d_gate_up.to(x.dtype)
    dw_gate_up = grouped_gemm_dw_triton(x, d_gate_up, counts, x_index=rows)
    dx = x.new_empty(0)
    if need_dx:
        dx_sorted = grouped_gemm_triton(d_gate_up, w_gate_up, counts, trans_w=True, out_dtype=fp32)
        dx = scatter_add_rows_triton(dx_sorted, rows, x.shape[0], out_dtype=x.dtype)
    return dx, dw_gate_up, dw_down, dweight


# ---- grouped_mm: torch._grouped_mm for the GEMMs, index ops for the row moves ----------------
# torch._grouped_mm writes its output dtype only (no fp32 output for bf16 inputs), so row-space
# gradients are upcast right after each GEMM, and scatters accumulate in fp32 as Triton's do.
def _scatter_add_fp32(src: torch.Tensor, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
    return out.index_add_(0, rows, src.float()).to(like.dtype)


def _forward_grouped_mm(x, w_gate_up, w_down, rows, counts, weight):
    hidden, A = w_down.shape[1], rows.numel()
    gate_up = gmm_grouped_mm(x, w_gate_up, counts, rows, None, A, False)
    silu = F.silu(gate_up[:, :hidden])
    act = silu * gate_up[:, hidden:]
    out = gmm_grouped_mm(act, w_down, counts, None, None, A, False)
    if weight is not None:
        out = out.float() * weight[:, None].float()
    return _scatter_add_fp32(out, rows, x), gate_up, silu, act


def _backward_grouped_mm(dy, x, w_gate_up, w_down, rows, counts, weight, gate_up, silu, act, need_dx):
    A = rows.numel()
    dy_rows = dy.index_select(0, rows)
    d_act = gmm_grouped_mm(dy_rows, w_down, counts, None, None, A, True).float()  # of the unweighted output
    if weight is not None:
        weight_col = weight[:, None].float()
        dweight = (d_act * act.float()).sum(dim=1).to(weight.dtype)
        dw_down = gmm_dw_grouped_mm((act.float() * weight_col).to(act.dtype), dy_rows, counts, None, None)
        d_act = d_act * weight_col
    else:
        dweight = x.new_empty(0)
        dw_down = gmm_dw_grouped_mm(act, dy_rows, counts, None, None)
    d_gate_up = _swiglu_grads(
        d_act, gate_up.float(), silu.float(), d_act.new_empty(gate_up.shape), torch.empty_like(d_act)
    ).to(x.dtype)
    dw_gate_up = gmm_dw_grouped_mm(x, d_gate_up, counts, rows, None)
    dx = x.new_empty(0)
    if need_dx:
        dx = _scatter_add_fp32(gmm_grouped_mm(d_gate_up, w_gate_up, counts, None, None, A, True), rows, x)
    return dx, dw_gate_up, dw_down, dweight


_IMPLS = {
    "torch": (_forward_torch, _backward_torch),
    "triton": (_forward_triton, _backward_triton),
    "grouped_mm": (_forward_grouped_mm, _backward_grouped_mm),
}


# ---- custom ops -------------------------------------------------------------------------------
@torch.library.custom_op("sparse_train::swiglu_experts", mutates_args=())
def _swiglu_experts_op(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    rows: torch.Tensor,
    counts: torch.Tensor,
    weight: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _IMPLS[backend][0](x, w_gate_up, w_down, rows, counts, weight)


@_swiglu_experts_op.register_fake
def _(x, w_gate_up, w_down, rows, counts, weight, backend):
    A, hidden = rows.shape[0], w_down.shape[1]
    return x.new_empty(x.shape), x.new_empty(A, 2 * hidden), x.new_empty(A, hidden), x.new_empty(A, hidden)


@torch.library.custom_op("sparse_train::swiglu_experts_backward", mutates_args=())
def _swiglu_experts_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    rows: torch.Tensor,
    counts: torch.Tensor,
    weight: torch.Tensor | None,
    gate_up: torch.Tensor,
    silu: torch.Tensor,
    act: torch.Tensor,
    need_dx: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (dy.contiguous(), x, w_gate_up, w_down, rows, counts, weight, gate_up, silu, act, need_dx)
    return _IMPLS[backend][1](*args)


@_swiglu_experts_backward_op.register_fake
def _(dy, x, w_gate_up, w_down, rows, counts, weight, gate_up, silu, act, need_dx, backend):
    dweight = weight.new_empty(weight.shape) if weight is not None else x.new_empty(0)
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return dx, w_gate_up.new_empty(w_gate_up.shape), w_down.new_empty(w_down.shape), dweight


def _setup(ctx, inputs, output) -> None:
    x, w_gate_up, w_down, rows, counts, weight, backend = inputs
    _, gate_up, silu, act = output
    ctx.save_for_backward(x, w_gate_up, w_down, rows, counts, weight, gate_up, silu, act)
    ctx.set_materialize_grads(False)  # gate_up, silu, act are outputs only to be saved: no zero grads for them
    ctx.backend = backend


def _backward(ctx, dy, _d_gate_up, _d_silu, _d_act):
    if dy is None:  # the output was not used (grads are not materialised for this op)
        return None, None, None, None, None, None, None
    x, w_gate_up, w_down, rows, counts, weight, gate_up, silu, act = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    dx, dw_gate_up, dw_down, dweight = _swiglu_experts_backward_op(
        dy, x, w_gate_up, w_down, rows, counts, weight, gate_up, silu, act, need_dx, ctx.backend
    )
    return (dx if need_dx else None), dw_gate_up, dw_down, None, None, (dweight if weight is not None else None), None


_swiglu_experts_op.register_autograd(_backward, setup_context=_setup)


# ---- reference and entry point ----------------------------------------------------------------
def swiglu_experts_reference(x, w_gate_up, w_down, rows, counts, weight=None) -> torch.Tensor:
    hidden = w_down.shape[1]
    y = torch.zeros_like(x)
    start = 0
    for e, n in enumerate(counts.tolist()):
        idx = rows[start : start + n]
        x_e = x[idx]
        out_e = (F.silu(x_e @ w_gate_up[e, :, :hidden]) * (x_e @ w_gate_up[e, :, hidden:])) @ w_down[e]
        if weight is not None:
            out_e = out_e * weight[start : start + n, None].to(out_e.dtype)
        y = y.index_add(0, idx, out_e)
        start += n
    return y


def swiglu_experts(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    rows: torch.Tensor,
    counts: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Weighted SwiGLU experts over routed rows of x; see the module docstring."""
    E, D, hidden = w_down.shape[0], w_down.shape[2], w_down.shape[1]
    if w_gate_up.shape != (E, D, 2 * hidden):
        raise ValueError(
            f"swiglu_experts: w_gate_up must be [E, D, 2F] = {(E, D, 2 * hidden)}, got {tuple(w_gate_up.shape)}"
        )
    if rows.dim() != 1 or counts.dim() != 1 or counts.numel() != E:
        raise ValueError(f"swiglu_experts: rows [A] and counts [E={E}] expected")
    if weight is not None and weight.shape != rows.shape:
        raise ValueError(f"swiglu_experts: weight must be [A={rows.numel()}], got {tuple(weight.shape)}")
    backend = resolve_backend(backend, x.device)
    x, w_gate_up, w_down = autocast_inputs(x, w_gate_up, w_down)
    if backend == "grouped_mm":
        check_grouped_mm_operands(x.device, x.dtype, d_model=D, expert_hidden=hidden)
    with torch.autocast(x.device.type, enabled=False):
        if backend == "reference":
            return swiglu_experts_reference(x, w_gate_up, w_down, rows, counts, weight)
        y, *_ = _swiglu_experts_op(x.contiguous(), w_gate_up, w_down, rows, counts.to(torch.int64), weight, backend)
        return y
