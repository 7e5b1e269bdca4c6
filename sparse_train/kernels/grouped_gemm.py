"""Grouped GEMM: rows of `x` sorted by group, group g multiplied by its own matrix `w[g]`.

    x_TK   [T, K]  rows sorted by group
    w_GKN  [G, K, N]
    counts [G]     int64, rows per group, summing to T
    ->     [T, N]

Backends:
  "torch"      one matmul per non-empty group over contiguous row slices, written into one
               preallocated output; a hand-written backward (dX = dY w^T per group,
               dW_g = x_g^T dY_g). No per-token work and no padding.
  "reference"  the obviously-correct version: for every group, select its rows with a boolean
               mask and multiply; plain autograd. Used by tests as ground truth.
  "auto"       the fastest backend available for the device ("torch" on CPU).
"""

from __future__ import annotations

from typing import Literal

import torch

Backend = Literal["auto", "torch", "reference"]


def _check(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> None:
    if x.dim() != 2 or w.dim() != 3:
        raise ValueError(f"grouped_gemm expects x [T, K] and w [G, K, N], got {tuple(x.shape)}, {tuple(w.shape)}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"grouped_gemm: x has K={x.shape[1]} but w has K={w.shape[1]}")
    if counts.shape != (w.shape[0],):
        raise ValueError(f"grouped_gemm: counts must be [G={w.shape[0]}], got {tuple(counts.shape)}")


class _GroupedMatmul(torch.autograd.Function):
    """Per-group matmuls over contiguous slices of one buffer, forward and backward."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, w: torch.Tensor, sizes: list[int]):
        out = x.new_empty(x.shape[0], w.shape[2])
        start = 0
        for g, n in enumerate(sizes):
            if n:
                torch.mm(x[start : start + n], w[g], out=out[start : start + n])
            start += n
        ctx.save_for_backward(x, w)
        ctx.sizes = sizes
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor):
        x, w = ctx.saved_tensors
        sizes: list[int] = ctx.sizes
        grad_out = grad_out.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = x.new_empty(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = torch.zeros_like(w)
        start = 0
        for g, n in enumerate(sizes):
            if n:
                dy = grad_out[start : start + n]
                if grad_x is not None:
                    torch.mm(dy, w[g].t(), out=grad_x[start : start + n])
                if grad_w is not None:
                    torch.mm(x[start : start + n].t(), dy, out=grad_w[g])
            start += n
        return grad_x, grad_w, None


def _autocast_inputs(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Under autocast, cast both operands to the autocast dtype (the cast stays on the autograd tape)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return x.to(dtype), w.to(dtype)
    if x.dtype != w.dtype:
        raise ValueError(f"grouped_gemm: x is {x.dtype} but w is {w.dtype}")
    return x, w


def grouped_gemm_torch(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    _check(x, w, counts)
    sizes = [int(n) for n in counts.tolist()]
    if sum(sizes) != x.shape[0]:
        raise ValueError(f"grouped_gemm: counts sum to {sum(sizes)} but x has {x.shape[0]} rows")
    x, w = _autocast_inputs(x, w)
    with torch.autocast(x.device.type, enabled=False):
        return _GroupedMatmul.apply(x.contiguous(), w, sizes)


def grouped_gemm_reference(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    _check(x, w, counts)
    x, w = _autocast_inputs(x, w)
    group_of_row = torch.repeat_interleave(torch.arange(w.shape[0], device=x.device), counts.to(x.device))
    if group_of_row.numel() != x.shape[0]:
        raise ValueError(f"grouped_gemm: counts sum to {group_of_row.numel()} but x has {x.shape[0]} rows")
    out = x.new_zeros(x.shape[0], w.shape[2])
    for g in range(w.shape[0]):
        rows = group_of_row == g
        out[rows] = x[rows] @ w[g]
    return out


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, *, backend: Backend = "auto") -> torch.Tensor:
    """`[T,K] x [G,K,N] -> [T,N]`, group g's rows (contiguous, in order) multiplied by `w[g]`."""
    if backend in ("auto", "torch"):
        return grouped_gemm_torch(x, w, counts)
    if backend == "reference":
        return grouped_gemm_reference(x, w, counts)
    raise ValueError(f"grouped_gemm: unknown backend {backend!r}; allowed: auto, torch, reference")
