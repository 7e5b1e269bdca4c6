from __future__ import annotations

import pytest
import torch

from sparse_train.kernels import permute, unpermute
from tests.kernels.helpers import FAST_BACKENDS, assert_all_close


def _problem(dtype, A=23, T=9, D=70, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g).to(dtype)
    index = torch.randint(0, T, (A,), generator=g)  # repeats: a token routed to several experts
    weight = torch.rand(A, generator=g)
    return x, index, weight


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_permute_matches_reference(backend, dtype):
    x, index, _ = _problem(dtype)
    dy = torch.randn(index.numel(), x.shape[1]).to(dtype)
    results = {}
    for b, xb, dyb in ((backend, x, dy), ("reference", x, dy), ("exact", x.double(), dy.double())):
        xx = xb.detach().clone().requires_grad_()
        out = permute(xx, index, backend="reference" if b == "exact" else b)
        results[b] = [out, torch.autograd.grad(out, xx, dyb)[0]]
    assert_all_close(results[backend], results["exact"], ["out", "dx"], dtype, results["reference"])
    torch.testing.assert_close(results[backend][0], x[index])


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [True, False])
def test_unpermute_matches_reference_including_weight_grads(backend, dtype, weighted):
    x, index, weight = _problem(dtype, seed=1)
    y = torch.randn(index.numel(), x.shape[1]).to(dtype)
    dout = torch.randn(x.shape[0] + 2, x.shape[1]).to(dtype)
    results = {}
    for b, yb, wb, db in (
        (backend, y, weight, dout),
        ("reference", y, weight, dout),
        ("exact", y.double(), weight.double(), dout.double()),
    ):
        yy = yb.detach().clone().requires_grad_()
        ww = wb.detach().clone().requires_grad_() if weighted else None
        out = unpermute(yy, index, ww, x.shape[0] + 2, backend="reference" if b == "exact" else b)
        inputs = [yy, ww] if weighted else [yy]
        results[b] = [out, *torch.autograd.grad(out, inputs, db)]
    names = ["out", "dy", "dweight"][: len(results[backend])]
    assert_all_close(results[backend], results["exact"], names, dtype, results["reference"])
    assert torch.count_nonzero(results[backend][0][-2:]) == 0  # rows nobody scattered to stay zero


def test_unpermute_inverts_permute_with_unit_weights():
    x, _, _ = _problem(torch.float32)
    index = torch.randperm(x.shape[0])
    torch.testing.assert_close(unpermute(permute(x, index), index, None, x.shape[0]), x)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_permute_ops_pass_opcheck(backend):
    x, index, weight = _problem(torch.float32, A=7, T=5, D=4)
    torch.library.opcheck(torch.ops.sparse_train.permute, (x.requires_grad_(), index, backend))
    y = torch.randn(7, 4, requires_grad=True)
    torch.library.opcheck(torch.ops.sparse_train.unpermute, (y, index, weight.requires_grad_(), 5, backend))
