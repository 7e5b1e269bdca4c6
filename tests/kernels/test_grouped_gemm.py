from __future__ import annotations

import pytest
import torch

from sparse_train.kernels import grouped_gemm

SHAPES = [
    # (counts, K, N): empty groups, one-row groups, all rows in one group, odd sizes
    ([3, 0, 1, 5], 8, 6),
    ([0, 0, 7], 5, 3),
    ([1, 1, 1, 1, 1], 4, 4),
    ([0, 0, 0], 4, 4),
    ([13, 2, 0, 9], 17, 11),
]


@pytest.mark.parametrize(("counts", "K", "N"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_backend_matches_reference_in_outputs_and_grads(counts, K, N, dtype):
    T, G = sum(counts), len(counts)
    counts_t = torch.tensor(counts, dtype=torch.int64)
    x = torch.randn(T, K, dtype=dtype, requires_grad=True)
    w = torch.randn(G, K, N, dtype=dtype, requires_grad=True)
    dy = torch.randn(T, N, dtype=dtype)
    results = {}
    for backend in ("torch", "reference"):
        y = grouped_gemm(x, w, counts_t, backend=backend)
        gx, gw = torch.autograd.grad(y, (x, w), dy) if T else (torch.zeros_like(x), torch.zeros_like(w))
        results[backend] = (y, gx, gw)
    for a, b in zip(results["torch"], results["reference"], strict=True):
        torch.testing.assert_close(a, b)
    # and the reference itself is right: row by row against its group's matrix
    group = torch.repeat_interleave(torch.arange(G), counts_t)
    for row in range(T):
        torch.testing.assert_close(results["reference"][0][row], x[row] @ w[group[row]])
    # empty groups get a zero weight gradient
    for g, n in enumerate(counts):
        if n == 0:
            assert torch.count_nonzero(results["torch"][2][g]) == 0


def test_bf16_autocast_computes_in_bf16_and_grads_reach_fp32_weights():
    counts = torch.tensor([4, 0, 3])
    x = torch.randn(7, 16, requires_grad=True)
    w = torch.randn(3, 16, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = grouped_gemm(x, w, counts, backend="torch")
        ref = grouped_gemm(x, w, counts, backend="reference")
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref)
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    torch.testing.assert_close(w.grad[0], (x[:4].t() @ torch.ones(4, 8)).detach(), atol=0.2, rtol=0.05)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_counts_must_cover_all_rows(backend):
    with pytest.raises(ValueError, match="counts sum to 4 but x has 5 rows"):
        grouped_gemm(torch.randn(5, 3), torch.randn(2, 3, 3), torch.tensor([2, 2]), backend=backend)


def test_shape_errors():
    with pytest.raises(ValueError, match="K=3"):
        grouped_gemm(torch.randn(5, 3), torch.randn(2, 4, 3), torch.tensor([2, 3]))
    with pytest.raises(ValueError, match="unknown backend"):
        grouped_gemm(torch.randn(5, 3), torch.randn(2, 3, 3), torch.tensor([2, 3]), backend="cuda-magic")
