"""FLOP formulas of our custom operators, for torch's FlopCounterMode (which counts aten's matmuls
but knows nothing of a custom op's inside): what a dry run measures and the planner predicts
from (docs/decisions.md §53). Counted as 2 FLOPs per multiply-add of the GEMMs, as torch does;
the element-wise activation is not counted (nor is it for aten ops).

Shape legend: A routed assignments (rows computed), D model width, F expert hidden width,
K, N a grouped GEMM's inner and output widths.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from sparse_train.kernels import expert_mlp, grouped_gemm  # noqa: F401  (the ops exist once these are imported)


@register_flop_formula(torch.ops.sparse_train.swiglu_experts)
def _swiglu_experts(x, w_gate_up, w_down, rows, counts, weight, backend, out_shape=None, **kwargs) -> int:
    """gate/up [A, D] x [D, 2F] and down [A, F] x [F, D] per assignment."""
    A, (F, D) = rows[0], w_down[1:]
    return 2 * A * D * 2 * F + 2 * A * F * D


@register_flop_formula(torch.ops.sparse_train.swiglu_experts_backward)
def _swiglu_experts_backward(
    dy, x, w_gate_up, w_down, rows, counts, weight, gate_up, silu, act, need_dx, backend, out_shape=None, **kwargs
) -> int:
    """d(act) and dW_down (2 A F D each), dW_gate_up (4 A D F) and, when asked, dx (4 A D F)."""
    A, (F, D) = rows[0], w_down[1:]
    return (2 + 2 + 4 + (4 if need_dx else 0)) * A * D * F


@register_flop_formula(torch.ops.sparse_train.grouped_gemm)
def _grouped_gemm(x, w, counts, x_index, out_index, out_rows, trans_w, backend, out_shape=None, **kwargs) -> int:
    """Each computed row [K] times its expert's [K, N] (w [E, K, N], or [E, N, K] transposed)."""
    rows = x_index[0] if x_index is not None else x[0]
    K, N = (w[2], w[1]) if trans_w else (w[1], w[2])
    return 2 * rows * K * N


@register_flop_formula(torch.ops.sparse_train.grouped_gemm_dw)
def _grouped_gemm_dw(x, dy, counts, x_index, dy_index, backend, out_shape=None, **kwargs) -> int:
    """Each expert's x rows^T [K, rows] times dy rows [rows, N]."""
    rows = dy_index[0] if dy_index is not None else dy[0]
    return 2 * rows * x[1] * dy[1]
