"""Grouped GEMM: rows sorted by group, group g multiplied by its own matrix `w[g]`.

    x       [R, K]      input rows
    w       [G, K, N]   one matrix per group
    counts  [G] int64   sorted rows per group (sum = A)
    ->      [A, N]      sorted row m of group g: x[m] @ w[g]

Optional fused gather / scatter (ScatterMoE's scatter2scatter): with `x_index` [A] sorted row
m reads x[x_index[m]] (no permuted copy of x is made); with `out_index` [A] (distinct rows) it
writes out[out_index[m]] of an `out_rows`-row output whose other rows are zero.

Backends:
  "triton"      Triton kernels (GPU; CPU tensors under TRITON_INTERPRET=1)
  "torch"       one matmul per non-empty group over contiguous slices, no padding, no per-token
                Python; the backward is hand-written
  "grouped_mm"  torch._grouped_mm (torch >= 2.9): CUTLASS grouped GEMM on CUDA, a loop on CPU;
                gathers and scatters are separate index ops. On CUDA torch documents bf16 on
                compute capability >= 8.0, and its loads need 16-byte aligned rows (K and N
                multiples of 8 in bf16): anything else is refused in one line, never guessed at
  "reference"   per-group boolean-mask loop with plain autograd; the ground truth in tests
  "auto"        triton on CUDA when installed, torch elsewhere; never grouped_mm, an opt-in
                peer until GPU measurements say where it is faster (docs/gpu.md)

The fast backends run through the custom op `sparse_train::grouped_gemm`, which has a fake
(meta) implementation and a registered autograd formula, so `torch.compile` traces through it.
"""

from __future__ import annotations

from functools import cache
from typing import Literal

import torch

Backend = Literal["auto", "triton", "torch", "grouped_mm", "reference"]
BACKENDS = ("auto", "triton", "torch", "grouped_mm", "reference")

# torch.nn.functional.grouped_mm's documentation (torch 2.13): "bfloat16 values on CUDA devices
# with SM >= 80". Its CPU kernel (a loop over groups) takes fp32, bf16 and fp16 (measured here).
GROUPED_MM_MIN_CAPABILITY = (8, 0)
GROUPED_MM_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
    if backend == "grouped_mm":
        reason = grouped_mm_device_problem(device.type, _capability(device), hasattr(torch, "_grouped_mm"))
        if reason:
            raise RuntimeError(reason)
    return backend


def _capability(device: torch.device) -> tuple[int, int] | None:
    return _cuda_capability(device.index if device.index is not None else -1) if device.type == "cuda" else None


@cache
def _cuda_capability(index: int) -> tuple[int, int]:
    # Cached: resolve_backend runs on every layer call, and the answer never changes.
    return torch.cuda.get_device_capability(None if index < 0 else index)


def grouped_mm_device_problem(device_type: str, capability: tuple[int, int] | None, has_op: bool) -> str | None:
    """Why torch._grouped_mm cannot run on this device, in one line; None when it can.
    A pure function of what it is told, so CPU tests cover the GPU branches."""
    if not has_op:
        return f"kernel backend 'grouped_mm' needs torch >= 2.9 (torch._grouped_mm); this is torch {torch.__version__}"
    if device_type == "cpu":
        return None
    if device_type != "cuda":
        return f"kernel backend 'grouped_mm' runs on CUDA and CPU, not on {device_type}: use 'torch'"
    if capability is None or capability < GROUPED_MM_MIN_CAPABILITY:
        have = "unknown" if capability is None else f"{capability[0]}.{capability[1]}"
        return (
            "kernel backend 'grouped_mm' needs a CUDA GPU of compute capability >= 8.0 (torch._grouped_mm); "
            f"this one is {have}: use 'triton'"
        )
    return None


def grouped_mm_operand_problem(device_type: str, dtype: torch.dtype, widths: dict[str, int]) -> str | None:
    """Why torch._grouped_mm cannot take operands of this dtype and these row widths, in one
    line; None when it can. Its rows must be 16-byte aligned on CPU and CUDA alike: the CPU
    kernel raises otherwise (measured, torch 2.13), and on CUDA, where its loads are TMA loads,
    misaligned strides have given silently wrong results (pytorch/pytorch#150374). Refused here,
    in the caller's terms, rather than padded behind the caller's back."""
    allowed = (torch.bfloat16,) if device_type == "cuda" else GROUPED_MM_CPU_DTYPES
    if dtype not in allowed:
        if device_type == "cuda":
            return (
                f"kernel backend 'grouped_mm' on CUDA takes bfloat16 operands (the dtype torch documents), "
                f"got {dtype}: train with train.precision=bf16, or use 'triton'"
            )
        return f"kernel backend 'grouped_mm' takes float32, bfloat16 or float16 operands, got {dtype}"
    per_row = 16 // dtype.itemsize  # elements per 16 bytes
    bad = {name: n for name, n in widths.items() if n % per_row}
    if bad:
        listed = ", ".join(f"{name}={n}" for name, n in bad.items())
        return (
            f"kernel backend 'grouped_mm' needs row widths that are multiples of {per_row} in {dtype} "
            f"(16-byte aligned rows), got {listed}: use 'triton' or 'torch'"
        )
    return None


def check_grouped_mm_operands(device: torch.device, dtype: torch.dtype, **widths: int) -> None:
    reason = grouped_mm_operand_problem(device.type, dtype, widths)
    if reason:
        raise ValueError(reason)


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


# ---- torch._grouped_mm ------------------------------------------------------------------------
def _grouped_mm_offsets(counts: torch.Tensor) -> torch.Tensor:
    """int32 group ends, the form torch._grouped_mm takes; computed on the device, no sync."""
    return torch.cumsum(counts, 0).to(torch.int32)


def _grouped_mm_operand(t: torch.Tensor) -> torch.Tensor:
    """`t` when torch._grouped_mm can read it in place (unit stride in one of the last two dims,
    16-byte aligned start), else a contiguous copy. A slice of a wider tensor can start at any
    element, and the GPU kernel's loads need the alignment."""
    s, n = t.stride(), t.shape
    row_major = s[-1] == 1 and s[-2] >= max(1, n[-1])
    col_major = s[-2] == 1 and s[-1] >= max(1, n[-2])
    if (row_major or col_major) and t.data_ptr() % 16 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def gmm_grouped_mm(
    x: torch.Tensor,
    w: torch.Tensor,
    counts: torch.Tensor,
    x_index: torch.Tensor | None,
    out_index: torch.Tensor | None,
    out_rows: int,
    trans_w: bool,
) -> torch.Tensor:
    N = w.shape[1] if trans_w else w.shape[2]
    rows_x = x.index_select(0, x_index) if x_index is not None else x
    if rows_x.shape[0] == 0 or N == 0 or x.shape[1] == 0:
        sorted_out = x.new_zeros(rows_x.shape[0], N)  # degenerate shapes torch._grouped_mm refuses
    else:
        b = w.transpose(1, 2) if trans_w else w
        offs = _grouped_mm_offsets(counts)
        # offs[-1] equals the row count (checked by the caller): rows past it would be left
        # uninitialised by torch._grouped_mm (pytorch/pytorch#193633).
        sorted_out = torch._grouped_mm(_grouped_mm_operand(rows_x), _grouped_mm_operand(b), offs=offs).contiguous()
    if out_index is None:
        return sorted_out
    return x.new_zeros(out_rows, N).index_copy_(0, out_index, sorted_out)


def gmm_dw_grouped_mm(
    x: torch.Tensor,
    dy: torch.Tensor,
    counts: torch.Tensor,
    x_index: torch.Tensor | None,
    dy_index: torch.Tensor | None,
) -> torch.Tensor:
    G, K, N = counts.numel(), x.shape[1], dy.shape[1]
    rows_x = x.index_select(0, x_index) if x_index is not None else x
    rows_dy = dy.index_select(0, dy_index) if dy_index is not None else dy
    if rows_x.shape[0] == 0 or G == 0 or K == 0 or N == 0:
        return x.new_zeros(G, K, N)
    # 2d x 2d form: the token dimension is the contraction, cut into groups by offs
    dw = torch._grouped_mm(
        _grouped_mm_operand(rows_x.t()), _grouped_mm_operand(rows_dy), offs=_grouped_mm_offsets(counts)
    ).contiguous()
    # An empty group's gradient is zero by definition; torch's kernel has returned non-zero
    # values there on B200 (pytorch/pytorch#172439), so it is written here (no host sync).
    return dw.masked_fill_(counts.eq(0)[:, None, None], 0)


def _gmm_impl(backend: str):
    if backend == "triton":
        from sparse_train.kernels.triton_kernels import grouped_gemm_triton

        return lambda x, w, c, xi, oi, rows, t: grouped_gemm_triton(x, w, c, xi, oi, rows, t)
    if backend == "grouped_mm":
        return gmm_grouped_mm
    return gmm_torch


def _gmm_dw_impl(backend: str):
    if backend == "triton":
        from sparse_train.kernels.triton_kernels import grouped_gemm_dw_triton

        return grouped_gemm_dw_triton
    if backend == "grouped_mm":
        return gmm_dw_grouped_mm
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
    if backend == "grouped_mm":
        check_grouped_mm_operands(x.device, x.dtype, K=w.shape[1], N=w.shape[2])
    with torch.autocast(x.device.type, enabled=False):
        if backend == "reference":
            return grouped_gemm_reference(x, w, counts, x_index, out_index, out_rows)
        return _grouped_gemm_op(x.contiguous(), w, counts.to(torch.int64), x_index, out_index, rows, False, backend)
