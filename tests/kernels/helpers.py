"""Shared helpers for kernel tests: routed problems with awkward shapes, and comparisons."""

from __future__ import annotations

import pytest
import torch

from sparse_train.kernels import triton_available

requires_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
requires_grouped_mm = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch < 2.9: no torch._grouped_mm")

# On CPU, grouped_mm runs torch._grouped_mm's CPU kernel: the same dataflow the GPU runs, with
# the GPU's grouped GEMM replaced by torch's loop (the CUDA kernel itself: the gpu-marked tests).
FAST_BACKENDS = [
    "torch",
    pytest.param("triton", marks=requires_triton),
    pytest.param("grouped_mm", marks=requires_grouped_mm),
]

# Tolerances per dtype for results computed in different orders (fp32 accumulation throughout).
TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}


def routed_problem(counts: list[int], num_rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows_A, counts_E) for assignments sorted by expert, each reading a random row."""
    g = torch.Generator().manual_seed(seed)
    counts_t = torch.tensor(counts, dtype=torch.int64)
    rows = torch.randint(0, num_rows, (int(counts_t.sum()),), generator=g)
    return rows, counts_t


def assert_all_close(
    got: list[torch.Tensor],
    exact: list[torch.Tensor],
    names: list[str],
    dtype: torch.dtype,
    same_dtype_reference: list[torch.Tensor] | None = None,
) -> None:
    """fp32/fp64: elementwise closeness to the exact (float64) result.

    bf16/fp16: no worse than the obvious implementation in the same dtype. The error of `got`
    against the exact result may be at most twice that of `same_dtype_reference` (the reference
    backend run in `dtype`), or 8 ulps of `dtype` at the tensor's scale, whichever is larger
    (the floor keeps one lucky reference value on a tiny tensor from failing a correct kernel);
    this is the bar FlashAttention's tests use.
    """
    for i, (name, a, b) in enumerate(zip(names, got, exact, strict=True)):
        a, b = a.detach(), b.detach()
        if dtype in (torch.float32, torch.float64) or same_dtype_reference is None:
            torch.testing.assert_close(a.double(), b.double(), **TOL[dtype], msg=lambda m, name=name: f"{name}: {m}")
            continue
        if b.numel() == 0:
            continue
        err = float((a.double() - b.double()).abs().max())
        ref_err = float((same_dtype_reference[i].detach().double() - b.double()).abs().max())
        ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
        floor = 8 * ulp * max(1.0, float(b.double().abs().max()))
        assert err <= max(2 * ref_err, floor), f"{name}: error {err:.3g} vs the {dtype} reference's {ref_err:.3g}"
