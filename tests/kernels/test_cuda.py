"""The kernels on a real GPU: compiled Triton (not the interpreter) and torch._grouped_mm's CUDA
kernel, in fp32 and bf16, against the float64 reference, and the custom ops through
torch.library.opcheck on CUDA tensors. Every test here is `gpu`-marked (skipped without CUDA);
scripts/gpu-check.sh runs them. Shapes are large enough to take several tiles per group and to
use the autotuned configurations, with empty, one-row and non-multiple-of-block groups.
"""

from __future__ import annotations

import pytest
import torch

from sparse_train.kernels import grouped_gemm, permute, swiglu_experts, unpermute
from sparse_train.kernels.grouped_gemm import GROUPED_MM_MIN_CAPABILITY
from tests.kernels.helpers import assert_all_close, requires_grouped_mm, requires_triton
from tests.kernels.test_grouped_gemm import _opcheck_grouped_gemm
from tests.kernels.test_grouped_gemm import _run as run_gemm

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
COUNTS = [300, 0, 1, 4000, 77]  # tokens per expert: empty, one row, ragged tails


def _grouped_mm_runs() -> bool:
    return hasattr(torch, "_grouped_mm") and torch.cuda.get_device_capability() >= GROUPED_MM_MIN_CAPABILITY


# (backend, dtype) pairs this GPU runs; grouped_mm is bf16-only on CUDA (refusal tested below)
CASES = [
    pytest.param("triton", torch.float32, marks=requires_triton),
    pytest.param("triton", torch.bfloat16, marks=requires_triton),
    pytest.param("grouped_mm", torch.bfloat16, marks=requires_grouped_mm),
]


def _skip_unless_runs(backend: str) -> None:
    if backend == "grouped_mm" and not _grouped_mm_runs():
        pytest.skip(f"compute capability {torch.cuda.get_device_capability()} < 8.0: grouped_mm refuses (tested)")


@requires_triton
def test_triton_kernels_are_compiled_not_interpreted():
    """Under TRITON_INTERPRET the kernels would run on the CPU and these tests prove nothing."""
    from sparse_train.kernels.triton_kernels import interpreting

    assert not interpreting(), "TRITON_INTERPRET=1 is set: unset it to test the compiled kernels"


@pytest.mark.parametrize(("backend", "dtype"), CASES)
def test_grouped_gemm_on_cuda_matches_reference(backend, dtype):
    _skip_unless_runs(backend)
    g = torch.Generator(device=CUDA).manual_seed(0)
    counts = torch.tensor(COUNTS, device=CUDA)
    A, K, N = sum(COUNTS), 512, 1024
    x = torch.randn(A, K, device=CUDA, generator=g).to(dtype)
    w = (torch.randn(len(COUNTS), K, N, device=CUDA, generator=g) / K**0.5).to(dtype)
    dy = torch.randn(A, N, device=CUDA, generator=g).to(dtype)
    got = run_gemm(backend, x, w, counts, dy)
    want = run_gemm("reference", x.double(), w.double(), counts, dy.double())
    assert_all_close(got, want, ["out", "dx", "dw"], dtype, run_gemm("reference", x, w, counts, dy))
    assert torch.count_nonzero(got[2][1]) == 0, "an empty group's weight gradient must be exactly zero"


@pytest.mark.parametrize(("backend", "dtype"), CASES)
@pytest.mark.parametrize("weighted", [True, False], ids=["weighted", "unweighted"])
def test_swiglu_experts_on_cuda_match_reference_in_every_gradient(backend, dtype, weighted):
    _skip_unless_runs(backend)
    g = torch.Generator(device=CUDA).manual_seed(1)
    T, D, F = 2048, 256, 512
    counts = torch.tensor(COUNTS, device=CUDA)
    rows = torch.randint(0, T, (sum(COUNTS),), device=CUDA, generator=g)
    x = torch.randn(T, D, device=CUDA, generator=g).to(dtype)
    ws = [
        (torch.randn(len(COUNTS), D, 2 * F, device=CUDA, generator=g) / D**0.5).to(dtype),
        (torch.randn(len(COUNTS), F, D, device=CUDA, generator=g) / F**0.5).to(dtype),
    ]
    weight = torch.rand(rows.numel(), device=CUDA, generator=g) if weighted else None
    dy = torch.randn(T, D, device=CUDA, generator=g).to(dtype)

    def run(b, x, ws, weight, dy):
        leaves = [t.detach().clone().requires_grad_() for t in [x, *ws] + ([weight] if weight is not None else [])]
        y = swiglu_experts(
            leaves[0], leaves[1], leaves[2], rows, counts, leaves[3] if weight is not None else None, backend=b
        )
        return [y, *torch.autograd.grad(y, leaves, dy)]

    got = run(backend, x, ws, weight, dy)
    exact_weight = weight.double() if weight is not None else None
    exact = run("reference", x.double(), [w.double() for w in ws], exact_weight, dy.double())
    names = ["y", "dx", "dw_gate_up", "dw_down", "dweight"][: len(got)]
    assert_all_close(got, exact, names, dtype, run("reference", x, ws, weight, dy))


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_permute_and_unpermute_on_cuda_match_reference(dtype):
    g = torch.Generator(device=CUDA).manual_seed(2)
    T, A, D = 1000, 3000, 384
    x = torch.randn(T, D, device=CUDA, generator=g).to(dtype)
    index = torch.randint(0, T, (A,), device=CUDA, generator=g)
    weight = torch.rand(A, device=CUDA, generator=g)
    torch.testing.assert_close(permute(x, index, backend="triton"), x[index], rtol=0, atol=0)
    y = torch.randn(A, D, device=CUDA, generator=g).to(dtype)
    exact = unpermute(y.double(), index, weight.double(), T, backend="reference")
    same = unpermute(y, index, weight, T, backend="reference")
    assert_all_close([unpermute(y, index, weight, T, backend="triton")], [exact], ["out"], dtype, [same])


@pytest.mark.parametrize(("backend", "dtype"), CASES)
def test_custom_ops_pass_opcheck_on_cuda(backend, dtype):
    """Schema, fake implementation and autograd registration agree with the real CUDA kernels."""
    _skip_unless_runs(backend)
    _opcheck_grouped_gemm(backend, CUDA, dtype, K=64, N=32)
    rows = torch.tensor([4, 0, 0, 3, 2, 1, 5], device=CUDA)
    counts = torch.tensor([3, 0, 4], device=CUDA)
    x = torch.randn(6, 64, device=CUDA, dtype=dtype, requires_grad=True)
    ws = [
        torch.randn(3, 64, 64, device=CUDA, dtype=dtype).requires_grad_(),
        torch.randn(3, 32, 64, device=CUDA, dtype=dtype).requires_grad_(),
    ]
    weight = torch.rand(7, device=CUDA, requires_grad=True)
    torch.library.opcheck(torch.ops.sparse_train.swiglu_experts, (x, *ws, rows, counts, weight, backend))
    torch.library.opcheck(torch.ops.sparse_train.swiglu_experts, (x, *ws, rows, counts, None, backend))
    if backend == "triton":  # grouped_mm moves rows with torch's index ops, not custom kernels
        torch.library.opcheck(torch.ops.sparse_train.permute, (x, rows, backend))
        y = torch.randn(7, 64, device=CUDA, dtype=dtype, requires_grad=True)
        torch.library.opcheck(torch.ops.sparse_train.unpermute, (y, rows, weight, 6, backend))


@requires_grouped_mm
def test_grouped_mm_refuses_what_cuda_cannot_run_in_one_line():
    x, w, counts = (
        torch.randn(8, 64, device=CUDA),
        torch.randn(2, 64, 64, device=CUDA),
        torch.tensor([3, 5], device=CUDA),
    )
    if not _grouped_mm_runs():
        with pytest.raises(RuntimeError, match=r"^kernel backend 'grouped_mm' needs a CUDA GPU of compute capability"):
            grouped_gemm(x.bfloat16(), w.bfloat16(), counts, backend="grouped_mm")
        return
    with pytest.raises(ValueError, match=r"^kernel backend 'grouped_mm' on CUDA takes bfloat16"):
        grouped_gemm(x, w, counts, backend="grouped_mm")
    with pytest.raises(ValueError, match=r"multiples of 8 in torch.bfloat16"):
        grouped_gemm(x[:, :60].bfloat16(), w[:, :60].bfloat16(), counts, backend="grouped_mm")
    # under bf16 autocast, fp32 weights are cast on the way in and gradients reach them in fp32
    w.requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = grouped_gemm(x, w, counts, backend="grouped_mm")
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()
