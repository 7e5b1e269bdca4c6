from __future__ import annotations

import re

import pytest
import torch

from sparse_train.kernels import grouped_gemm
from tests.kernels.helpers import FAST_BACKENDS, assert_all_close, requires_triton

SHAPES = [
    # (counts, K, N): empty groups, one-row groups, sizes that are not block multiples
    ([3, 0, 1, 5], 8, 6),
    ([0, 0, 37], 33, 17),
    ([1, 1, 1, 1, 1], 16, 16),
    ([0, 0, 0], 4, 4),
    ([70, 2, 0, 9], 40, 24),
]


def _run(backend, x, w, counts, dy, **kw):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    y = grouped_gemm(x, w, counts, backend=backend, **kw)
    if y.numel() == 0:
        return [y, torch.zeros_like(x), torch.zeros_like(w)]
    return [y, *torch.autograd.grad(y, (x, w), dy)]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize(("counts", "K", "N"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference_in_outputs_and_grads(backend, counts, K, N, dtype):
    g = torch.Generator().manual_seed(0)
    A, G = sum(counts), len(counts)
    counts_t = torch.tensor(counts)
    x = torch.randn(A, K, generator=g).to(dtype)
    w = (torch.randn(G, K, N, generator=g) / K**0.5).to(dtype)
    dy = torch.randn(A, N, generator=g).to(dtype)
    if backend == "grouped_mm" and (K * dtype.itemsize % 16 or N * dtype.itemsize % 16):
        with pytest.raises(ValueError, match=r"^kernel backend 'grouped_mm' needs row widths .*16-byte aligned"):
            _run(backend, x, w, counts_t, dy)  # refused in one line, before torch's kernel sees it
        return
    got = _run(backend, x, w, counts_t, dy)
    want = _run("reference", x.double(), w.double(), counts_t, dy.double())
    same = _run("reference", x, w, counts_t, dy)
    assert got[0].dtype == dtype and got[2].dtype == dtype
    assert_all_close(got, want, ["out", "dx", "dw"], dtype, same)
    for gi, n in enumerate(counts):  # an empty group gets an exactly zero weight gradient
        if n == 0:
            assert torch.count_nonzero(got[2][gi]) == 0


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_fused_gather_and_scatter(backend):
    """Rows read through x_index (with repeats) and written through out_index, as scatter2scatter."""
    g = torch.Generator().manual_seed(1)
    counts = torch.tensor([4, 0, 9, 1])
    A, T, K, N = 14, 8, 12, 12 if backend == "grouped_mm" else 10  # grouped_mm: 16-byte rows
    x = torch.randn(T, K, generator=g)
    w = torch.randn(4, K, N, generator=g)
    x_index = torch.randint(0, T, (A,), generator=g)
    out_index = torch.randperm(A + 3, generator=g)[:A]
    dy = torch.randn(A + 3, N, generator=g)
    kw = dict(x_index=x_index, out_index=out_index, out_rows=A + 3)
    got = _run(backend, x, w, counts, dy, **kw)
    want = _run("reference", x.double(), w.double(), counts, dy.double(), **kw)
    assert_all_close(got, want, ["out", "dx", "dw"], torch.float32)
    unwritten = torch.ones(A + 3, dtype=torch.bool)
    unwritten[out_index] = False
    assert torch.count_nonzero(got[0][unwritten]) == 0


def test_reference_is_the_definition():
    g = torch.Generator().manual_seed(2)
    counts = torch.tensor([2, 0, 3])
    x, w = torch.randn(5, 4, generator=g), torch.randn(3, 4, 6, generator=g)
    out = grouped_gemm(x, w, counts, backend="reference")
    group = [0, 0, 2, 2, 2]
    for row in range(5):
        torch.testing.assert_close(out[row], x[row] @ w[group[row]])


def test_non_contiguous_weights():
    g = torch.Generator().manual_seed(3)
    counts = torch.tensor([3, 4])
    x = torch.randn(7, 5, generator=g)
    w = torch.randn(2, 6, 5, generator=g).transpose(1, 2)  # [2, 5, 6], not contiguous
    torch.testing.assert_close(
        grouped_gemm(x, w, counts, backend="torch"), grouped_gemm(x, w, counts, backend="reference")
    )


@requires_triton
@pytest.mark.parametrize("block_m", [16, 32, 64])
def test_every_autotune_config_is_correct(block_m):
    """Each configuration of the autotune set (and several BLOCK_M) computes the same product."""
    from sparse_train.kernels.triton_kernels import _GMM_CONFIGS, grouped_gemm_triton

    g = torch.Generator().manual_seed(4)
    counts = torch.tensor([17, 0, 40, 1])
    x, w = torch.randn(58, 70, generator=g), torch.randn(4, 70, 130, generator=g)
    want = grouped_gemm(x.double(), w.double(), counts, backend="reference")
    for config in _GMM_CONFIGS:
        got = grouped_gemm_triton(x, w, counts, block_sizes={"BLOCK_M": block_m, **config.kwargs})
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@requires_triton
def test_tile_schedule_covers_every_row_once():
    from sparse_train.kernels.triton_kernels import tile_schedule

    counts = torch.tensor([0, 5, 16, 0, 17, 1])
    tile_group, tile_row, group_end = tile_schedule(counts, int(counts.sum()), block_m=16)
    covered = []
    for grp, row in zip(tile_group.tolist(), tile_row.tolist(), strict=True):
        if grp >= 0:
            covered += list(range(row, min(row + 16, int(group_end[grp]))))
    assert covered == list(range(int(counts.sum())))


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_counts_must_cover_all_rows(backend):
    with pytest.raises(ValueError, match="counts sum to 4 but there are 5 rows"):
        grouped_gemm(torch.randn(5, 3), torch.randn(2, 3, 3), torch.tensor([2, 2]), backend=backend)


def test_shape_and_backend_errors():
    with pytest.raises(ValueError, match="K=3"):
        grouped_gemm(torch.randn(5, 3), torch.randn(2, 4, 3), torch.tensor([2, 3]))
    with pytest.raises(ValueError, match="unknown kernel backend"):
        grouped_gemm(torch.randn(5, 3), torch.randn(2, 3, 3), torch.tensor([2, 3]), backend="cuda-magic")


def test_bf16_autocast_computes_in_bf16_and_grads_reach_fp32_weights():
    counts = torch.tensor([4, 0, 3])
    x = torch.randn(7, 16, requires_grad=True)
    w = torch.randn(3, 16, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = grouped_gemm(x, w, counts, backend="torch")
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_custom_ops_pass_opcheck(backend):
    """Schema, fake (meta) implementation and autograd registration agree with the real kernel
    (the Triton one through the interpreter on CPU)."""
    K, N = (8, 4) if backend == "grouped_mm" else (6, 5)  # grouped_mm: 16-byte rows
    _opcheck_grouped_gemm(backend, torch.device("cpu"), torch.float32, K, N)


def _opcheck_grouped_gemm(backend: str, device: torch.device, dtype: torch.dtype, K: int, N: int) -> None:
    x = torch.randn(9, K, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(3, K, N, device=device, dtype=dtype, requires_grad=True)
    counts = torch.tensor([4, 0, 5], device=device)
    torch.library.opcheck(torch.ops.sparse_train.grouped_gemm, (x, w, counts, None, None, 9, False, backend))
    x_index = torch.tensor([8, 0, 0, 3, 2, 1, 5, 7, 6], device=device)  # rows read may repeat ...
    out_index = torch.tensor([8, 0, 1, 3, 2, 4, 5, 7, 6], device=device)  # ... rows written may not
    args = (x, w, counts, x_index, out_index, 9, False, backend)
    torch.library.opcheck(torch.ops.sparse_train.grouped_gemm, args)
    dy = torch.randn(9, N, device=device, dtype=dtype)
    torch.library.opcheck(torch.ops.sparse_train.grouped_gemm_dw, (x.detach(), dy, counts, None, None, backend))


def test_auto_never_picks_grouped_mm():
    """grouped_mm is opt-in: auto keeps to triton on CUDA and torch elsewhere (no CUDA call made)."""
    from sparse_train.kernels import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cuda")) in {"triton", "torch"}


def test_grouped_mm_device_rules_refuse_in_one_line():
    from sparse_train.kernels.grouped_gemm import grouped_mm_device_problem

    assert grouped_mm_device_problem("cpu", None, True) is None
    assert grouped_mm_device_problem("cuda", (8, 0), True) is None
    assert grouped_mm_device_problem("cuda", (9, 0), True) is None
    refusals = {
        "compute capability >= 8.0 .* 7.5: use 'triton'": ("cuda", (7, 5), True),
        "not on mps": ("mps", None, True),
        "needs torch >= 2.9": ("cpu", None, False),
    }
    for pattern, args in refusals.items():
        reason = grouped_mm_device_problem(*args)
        assert reason is not None and "\n" not in reason
        assert re.search(pattern, reason), reason


def test_grouped_mm_operand_rules_refuse_in_one_line():
    from sparse_train.kernels.grouped_gemm import grouped_mm_operand_problem

    assert grouped_mm_operand_problem("cuda", torch.bfloat16, {"K": 512, "N": 1024}) is None
    assert grouped_mm_operand_problem("cpu", torch.float32, {"K": 12, "N": 4}) is None
    # torch documents only bf16 on CUDA; fp32 runs on CPU
    assert "takes bfloat16" in grouped_mm_operand_problem("cuda", torch.float32, {"K": 512, "N": 1024})
    assert "float32, bfloat16 or float16" in grouped_mm_operand_problem("cpu", torch.float64, {"K": 8})
    # 16-byte rows: 8 bf16 elements, 4 fp32 ones
    assert "multiples of 8 in torch.bfloat16" in grouped_mm_operand_problem("cuda", torch.bfloat16, {"K": 12})
    assert grouped_mm_operand_problem("cpu", torch.bfloat16, {"K": 12, "N": 8}).endswith(
        "got K=12: use 'triton' or 'torch'"
    )
    assert grouped_mm_operand_problem("cpu", torch.float32, {"K": 12, "N": 8}) is None


def test_grouped_mm_backend_refuses_float64_before_running():
    with pytest.raises(ValueError, match=r"^kernel backend 'grouped_mm' takes float32, bfloat16 or float16"):
        grouped_gemm(
            torch.randn(4, 8).double(), torch.randn(2, 8, 8).double(), torch.tensor([1, 3]), backend="grouped_mm"
        )


def test_grouped_mm_operands_may_start_anywhere():
    """A weight slice that starts mid-row (not 16-byte aligned) is copied, not misread."""
    g = torch.Generator().manual_seed(5)
    counts = torch.tensor([3, 5])
    x = torch.randn(8, 8, generator=g)
    w = torch.randn(2, 8, 9, generator=g)[:, :, 1:]  # [2, 8, 8] starting one element in
    assert w.data_ptr() % 16
    torch.testing.assert_close(
        grouped_gemm(x, w, counts, backend="grouped_mm"), grouped_gemm(x, w, counts, backend="reference")
    )
