"""Shared helpers for kernel tests: routed problems with awkward shapes, and comparisons."""

from __future__ import annotations

import pytest
import torch

requires_triton = pytest.mark.skipif(
    pytest.importorskip.__module__ and not __import__("sparse_train.kernels", fromlist=["x"]).triton_available(),
    reason="triton is not installed",
)

FAST_BACKENDS = ["torch", pytest.param("triton", marks=requires_triton)]

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


def assert_all_close(got: list[torch.Tensor], want: list[torch.Tensor], names: list[str], dtype: torch.dtype) -> None:
    for name, a, b in zip(names, got, want, strict=True):
        torch.testing.assert_close(a.float(), b.float(), **TOL[dtype], msg=lambda m, name=name: f"{name}: {m}")
