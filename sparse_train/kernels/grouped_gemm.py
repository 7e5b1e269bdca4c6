"""Grouped GEMM: rows sorted by group, group g multiplied by its own matrix `w[g]`.

    x       [R, K]      input rows
    w       [G, K, N]   one matrix per group
    counts  [G] int64   sorted rows per group (sum = A)
    ->      [A, N]      sorted row m of group g: x[m] @ w[g]

Optional fused gather / scatter (ScatterMoE's scatter2scatter): with `x_index` [A] sorted row
m reads x[x_index[m]] (no permuted copy of x is made); with `out_index` [A] (distinct rows) it
writes out[out_index[m]] of an `out_rows`-row output whose other rows are zero.

Backends:
  "triton"     Triton kernels (GPU; CPU tensors under TRITON_INTERPRET=1)
  "torch"      one matmul per non-empty group over contiguous slices, no padding, no per-token
               Python; the backward is hand-written
  "reference"  per-group boolean-mask loop with plain autograd; the ground truth in tests
  "auto"       triton on CUDA when installed, torch elsewhere

"triton" and "torch" run through the custom op `sparse_train::grouped_gemm`, which has a fake
(meta) implementation and a registered autograd formula, so `torch.compile` traces through it.
"""

from __future__ import annotations

from typing import Literal

import torch

Backend = Literal["auto", "triton", "torch", "reference"]
BACKENDS = ("auto", "triton", "torch", "reference")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> 'triton' on CUDA (when installed), else 'torch'; validate explicit choices."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton" and not triton_available():
        raise RuntimeError("kernel backend 'triton' needs triton: pip install 'sparse_train[triton]'")
    return backend


def autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under autocast, cast float operands to the autocast dtype (the casts stay on the tape)."""
    device = tensors[0].device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return tuple(t.to(dtype) for t in tensors)
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1:
        raise ValueError(f"expert kernels need one dtype for all operands, got {sorted(map(str, dtypes))}")
    return tensors


# ---- torch implementations (also the CPU kernels of the custom ops) -------------------------
def gmm_torch(
    x: torch.Tensor,
    w: torch.Tensor,
    counts: torch.Tensor,
    x_index: torch.Tensor | None,
    out_index: torch.Tensor | None,
    out_rows: int,
    trans_w: bool,
) -> torch.Tensor:
    N = w.shape[1] if trans_w else w.shape[2]
    sorted_out = x.new_empty(x_index.numel() if x_index is not None else x.shape[0], N)
    start = 0
    for g, n in enumerate(counts.tolist()):
        if n:
            rows = slice(start, start + n)
            x_g = x.index_select(0, x_index[rows]) if x_index is not None else x[rows]
            torch.mm(x_g, w[g].t() if trans_w else w[g], out=sorted_out[rows])
        start += n
    if out_index is None:
        return sorted_out
    out = x.new_zeros(out_rows, N)
    return out.index_copy_(0, out_index, sorted_out)


def gmm_dw_torch(
    x: torch.Tensor,
    dy: torch.Tensor,
    counts: torch.Tensor,
    x_index: torch.Tensor | None,
    dy_index: torch.Tensor | None,
) -> torch.Tensor:
    dw = x.new_zeros(counts.numel(), x.shape[1], dy.shape[1])
    start = 0
    for g, n in enumerate(counts.tolist()):
        if n:
            rows = slice(start, start + n)
            x_g = x.index_select(0, x_index[rows]) if x_index is not None else x[rows]
            dy_g = dy.index_select(0, dy_index[rows]) if dy_index is not None else dy[rows]
            torch.mm(x_g.t(), dy_g, out=dw[g])
        start += n
    return dw


def _gmm_impl(backend: str):
    if backend == "triton":
        from sparse_train.kernels.triton_kernels import grouped_gemm_triton

        return lambda x, w, c, xi, oi, rows, t: grouped_gemm_triton(x, w, c, xi, oi, rows, t)
    return gmm_torch


def _gmm_dw_impl(backend: str):
    if backend == "triton":
        from sparse_train.kernels.triton_kernels import grouped_gemm_dw_triton

        return grouped_gemm_dw_triton
    return gmm_dw_torch


# ---- custom ops -------------------------------------------------------------------------------
@torch.library.custom_op("sparse_train::grouped_gemm", mutates_args=())
def _grouped_gemm_op(
    x: torch.Tensor,
    w: torch.Tensor,
    counts: torch.Tensor,
    x_index: torch.Tensor | None,
    out_index: torch.Tensor | None,
    out_rows: int,
    trans_w: bool,
    backend: str,
) -> torch.Tensor:
    return _gmm_impl(backend)(x, w, counts, x_index, out_index, out_rows, trans_w)


@_grouped_gemm_op.register_fake
def _(x, w, counts, x_index, out_index, out_rows, trans_w, backend):
    return x.new_empty(out_rows, w.shape[1] if trans_w else w.shape[2])


@torch.library.custom_op("sparse_train::grouped_gemm_dw", mutates_args=())
def _grouped_gemm_dw_op(
    x: torch.Tensor,
    dy: torch.Tensor,
    counts: torch.Tensor,
    x_index: torch.Tensor | None,
    dy_index: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    return _gmm_dw_impl(backend)(x, dy, counts, x_index, dy_index)


@_grouped_gemm_dw_op.register_fake
def _(x, dy, counts, x_index, dy_index, backend):
    return x.new_empty(counts.shape[0], x.shape[1], dy.shape[1])


def _gmm_setup(ctx, inputs, output) -> None:
    x, w, counts, x_index, out_index, out_rows, trans_w, backend = inputs
    ctx.save_for_backward(x, w, counts, x_index, out_index)
    ctx.trans_w, ctx.backend = trans_w, backend


def _gmm_backward(ctx, grad_out):
    x, w, counts, x_index, out_index = ctx.saved_tensors
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        sorted_rows = x_index.numel() if x_index is not None else x.shape[0]
        # dX (sorted rows) = dOut[out_index] @ w^T: the same kernel with w transposed
        grad_sorted = _grouped_gemm_op(grad_out, w, counts, out_index, None, sorted_rows, not ctx.trans_w, ctx.backend)
        grad_x = grad_sorted if x_index is None else x.new_zeros(x.shape).index_add_(0, x_index, grad_sorted)
    if ctx.needs_input_grad[1]:
        grad_w = _grouped_gemm_dw_op(x, grad_out, counts, x_index, out_index, ctx.backend)
        if ctx.trans_w:
            grad_w = grad_w.transpose(1, 2)
    return grad_x, grad_w, None, None, None, None, None, None


_grouped_gemm_op.register_autograd(_gmm_backward, setup_context=_gmm_setup)


# ---- the reference ----------------------------------------------------------------------------
def grouped_gemm_reference(
    x: torch.Tensor,
    w: torch.Tensor,
    counts: torch.Tensor,
    x_index: torch.Tensor | None = None,
    out_index: torch.Tensor | None = None,
    out_rows: int | None = None,
) -> torch.Tensor:
    rows_x = x[x_index] if x_index is not None else x
    group_of_row = torch.repeat_interleave(torch.arange(w.shape[0], device=x.device), counts.to(x.device))
    if group_of_row.numel() != rows_x.shape[0]:
        raise ValueError(f"grouped_gemm: counts sum to {group_of_row.numel()} but there are {rows_x.shape[0]} rows")
    sorted_out = rows_x.new_zeros(rows_x.shape[0], w.shape[2])
    for g in range(w.shape[0]):
        rows = group_of_row == g
        sorted_out[rows] = rows_x[rows] @ w[g]
    if out_index is None:
        return sorted_out
    out = sorted_out.new_zeros(out_rows if out_rows is not None else sorted_out.shape[0], w.shape[2])
    out[out_index] = sorted_out
    return out


# ---- the public entry point -------------------------------------------------------------------
def _check(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, x_index, out_index, out_rows) -> int:
    if x.dim() != 2 or w.dim() != 3:
        raise ValueError(f"grouped_gemm expects x [R, K] and w [G, K, N], got {tuple(x.shape)}, {tuple(w.shape)}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"grouped_gemm: x has K={x.shape[1]} but w has K={w.shape[1]}")
    if counts.shape != (w.shape[0],):
        raise ValueError(f"grouped_gemm: counts must be [G={w.shape[0]}], got {tuple(counts.shape)}")
    sorted_rows = x_index.numel() if x_index is not None else x.shape[0]
    if out_index is not None and out_index.numel() != sorted_rows:
        raise ValueError(f"grouped_gemm: out_index has {out_index.numel()} entries for {sorted_rows} sorted rows")
    if not counts.is_cuda and int(counts.sum()) != sorted_rows:  # on GPU this check would sync
        raise ValueError(f"grouped_gemm: counts sum to {int(counts.sum())} but there are {sorted_rows} rows")
    return sorted_rows if out_rows is None else out_rows


def grouped_gemm(
    x: torch.Tensor,
    w: torch.Tensor,
    counts: torch.Tensor,
    *,
    backend: Backend = "auto",
    x_index: torch.Tensor | None = None,
    out_index: torch.Tensor | None = None,
    out_rows: int | None = None,
) -> torch.Tensor:
    """Group g's sorted rows times `w[g]`; see the module docstring. Differentiable in x and w."""
    rows = _check(x, w, counts, x_index, out_index, out_rows)
    backend = resolve_backend(backend, x.device)
    x, w = autocast_inputs(x, w)
    with torch.autocast(x.device.type, enabled=False):
        if backend == "reference":
            return grouped_gemm_reference(x, w, counts, x_index, out_index, out_rows)
        return _grouped_gemm_op(x.contiguous(), w, counts.to(torch.int64), x_index, out_index, rows, False, backend)
