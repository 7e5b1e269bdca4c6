from __future__ import annotations

import pytest
import torch

from sparse_train.kernels import swiglu_experts
from tests.kernels.helpers import FAST_BACKENDS, assert_all_close, routed_problem

CASES = {
    # counts per expert, rows of x
    "empty-and-one-row-experts": ([0, 1, 6, 0, 25], 12),
    "all-to-one-expert": ([0, 0, 33, 0], 17),
    "single-assignment": ([1], 1),
    "no-assignments": ([0, 0, 0], 4),
    "odd-sizes": ([19, 3, 41], 30),
}
NAMES = ["y", "dx", "dw_gate_up", "dw_down", "dweight"]


def _weights(E, D, F, dtype, seed=0):
    """[w_gate_up [E, D, 2F], w_down [E, F, D]]."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g) / shape[1] ** 0.5).to(dtype) for shape in ((E, D, 2 * F), (E, F, D))]


def _run(backend, x, ws, rows, counts, weight, dy):
    x = x.detach().clone().requires_grad_()
    ws = [w.detach().clone().requires_grad_() for w in ws]
    inputs = [x, *ws]
    if weight is not None:
        weight = weight.detach().clone().requires_grad_()
        inputs.append(weight)
    y = swiglu_experts(x, *ws, rows, counts, weight, backend=backend)
    if rows.numel() == 0:
        return [y, *(torch.zeros_like(t) for t in inputs)]
    return [y, *torch.autograd.grad(y, inputs, dy)]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [True, False], ids=["weighted", "unweighted"])
def test_matches_reference_in_output_and_every_gradient(backend, case, dtype, weighted):
    counts, T = CASES[case]
    D, F = 24, 40
    rows, counts_t = routed_problem(counts, T)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(T, D, generator=g).to(dtype)
    weight = torch.rand(rows.numel(), generator=g) if weighted else None
    dy = torch.randn(T, D, generator=g).to(dtype)
    ws = _weights(len(counts), D, F, dtype)
    got = _run(backend, x, ws, rows, counts_t, weight, dy)
    exact_weight = None if weight is None else weight.double()
    exact = _run("reference", x.double(), [w.double() for w in ws], rows, counts_t, exact_weight, dy.double())
    same = _run("reference", x, ws, rows, counts_t, weight, dy)
    assert got[0].dtype == dtype
    assert_all_close(got, exact, NAMES[: len(got)], dtype, same)


def test_reference_is_a_sum_over_routed_experts():
    """Spelled out for one row: y[r] = sum_a weight_a * SwiGLU_e(a)(x[r])."""
    counts = torch.tensor([2, 1])
    rows = torch.tensor([0, 1, 0])  # row 0 goes to experts 0 and 1, row 1 to expert 0
    weight = torch.tensor([0.25, 1.0, 0.75])
    x = torch.randn(2, 4, dtype=torch.float64)
    wgu, wd = _weights(2, 4, 3, torch.float64)

    def expert(e, v):
        return (torch.nn.functional.silu(v @ wgu[e, :, :3]) * (v @ wgu[e, :, 3:])) @ wd[e]

    y = swiglu_experts(x, wgu, wd, rows, counts, weight, backend="torch")
    torch.testing.assert_close(y[0], 0.25 * expert(0, x[0]) + 0.75 * expert(1, x[0]))
    torch.testing.assert_close(y[1], 1.0 * expert(0, x[1]))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_fused_op_passes_opcheck(backend):
    D = 8 if backend == "grouped_mm" else 6  # grouped_mm: 16-byte rows
    rows, counts = routed_problem([3, 0, 4], 5)
    x = torch.randn(5, D, requires_grad=True)
    ws = [w.requires_grad_() for w in _weights(3, D, 8, torch.float32)]
    weight = torch.rand(7, requires_grad=True)
    torch.library.opcheck(torch.ops.sparse_train.swiglu_experts, (x, *ws, rows, counts, weight, backend))
    torch.library.opcheck(torch.ops.sparse_train.swiglu_experts, (x, *ws, rows, counts, None, backend))


def test_rejects_mismatched_routing():
    ws = _weights(3, 4, 5, torch.float32)
    with pytest.raises(ValueError, match="w_gate_up must be"):
        swiglu_experts(torch.randn(2, 4), ws[0][:, :, :9], ws[1], torch.tensor([0, 1]), torch.tensor([1, 1, 0]))
    with pytest.raises(ValueError, match="counts"):
        swiglu_experts(torch.randn(2, 4), *ws, torch.tensor([0, 1]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="weight"):
        swiglu_experts(torch.randn(2, 4), *ws, torch.tensor([0, 1]), torch.tensor([1, 1, 0]), torch.ones(3))


@pytest.mark.parametrize("case", ["empty-and-one-row-experts", "odd-sizes", "all-to-one-expert"])
def test_cpu_path_with_concurrent_expert_groups_matches_reference(case):
    """With several CPU threads the torch backend runs expert groups concurrently (cpu_parallel)."""
    counts, T = CASES[case]
    rows, counts_t = routed_problem(counts, T)
    g = torch.Generator().manual_seed(3)
    x, dy = torch.randn(T, 24, generator=g), torch.randn(T, 24, generator=g)
    weight = torch.rand(rows.numel(), generator=g)
    ws = _weights(len(counts), 24, 40, torch.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # three groups even where the machine has fewer cores
    try:
        got = _run("torch", x, ws, rows, counts_t, weight, dy)
        again = _run("torch", x, ws, rows, counts_t, weight, dy)
    finally:
        torch.set_num_threads(threads)
    exact = _run("reference", x.double(), [w.double() for w in ws], rows, counts_t, weight.double(), dy.double())
    assert_all_close(got, exact, NAMES, torch.float32)
    for a, b in zip(got, again, strict=True):
        assert torch.equal(a, b), "concurrent expert groups must give bitwise-identical results run to run"


def test_balanced_parts_split_rows_evenly_and_skip_empty_experts():
    from sparse_train.kernels.cpu_parallel import balanced_parts

    parts = balanced_parts([5, 0, 3, 3, 2, 0, 1], 2)
    assert sorted(e for p in parts for e in p) == [0, 2, 3, 4, 6]
    assert all(p == sorted(p) for p in parts)
    loads = sorted(sum([5, 0, 3, 3, 2, 0, 1][e] for e in p) for p in parts)
    assert loads == [7, 7]
    assert balanced_parts([0, 0], 2) == []
    assert balanced_parts([4], 3) == [[0]]
