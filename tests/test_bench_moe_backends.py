"""`sparse-train bench moe-layer` with several kernel backends, a precision and a device."""

from __future__ import annotations

import pytest
import torch

from sparse_train.bench.moe_layer import Shape, bench_shape
from tests.kernels.helpers import requires_grouped_mm, requires_triton

TINY = Shape("tiny", tokens=24, d_model=32, num_experts=4, top_k=2, expert_hidden=16)


def _bench(shape: Shape, backends: tuple[str, ...], precision: str = "fp32") -> dict:
    return bench_shape(
        shape, repeats=1, warmup=0, seed=0, peers=set(), log=lambda m: None, backends=backends, precision=precision
    )


@requires_triton
@requires_grouped_mm
def test_every_backend_is_timed_and_checked_against_the_reference():
    result = _bench(TINY, ("torch", "grouped_mm", "triton"))  # triton through the interpreter here
    assert result["kernel_backend"] == "torch" and result["ours_torch_ms"] == result["ours_ms"]
    for backend in ("torch", "grouped_mm", "triton"):
        assert result[f"ours_{backend}_ms"] > 0
        assert result[f"{backend}_max_abs_diff_vs_reference"] <= 1e-5
    assert result["ratio_vs_dense"] == pytest.approx(result["ours_ms"] / result["dense_ms"], rel=1e-3)


@requires_grouped_mm
def test_bf16_runs_every_candidate_under_autocast():
    result = _bench(TINY, ("grouped_mm",), precision="bf16")
    assert result["precision"] == "bf16" and result["kernel_backend"] == "grouped_mm"
    # bf16 rounding of unit-scale outputs: visible, but far below the outputs' size
    assert 0 < result["grouped_mm_max_abs_diff_vs_reference"] < 0.1
    assert result["ours_ms"] > 0 and result["dense_ms"] > 0


@requires_grouped_mm
def test_a_backend_that_cannot_run_is_null_with_its_reason_and_ours_must_run():
    misaligned = Shape("misaligned", tokens=48, d_model=32, num_experts=4, top_k=2, expert_hidden=6)
    result = _bench(misaligned, ("torch", "grouped_mm"))
    assert result["ours_grouped_mm_ms"] is None
    assert "16-byte aligned rows" in result["ours_grouped_mm_error"]
    assert "grouped_mm_max_abs_diff_vs_reference" not in result
    with pytest.raises(ValueError, match="16-byte aligned rows"):
        _bench(misaligned, ("grouped_mm", "torch"))  # the first backend is what is measured: no result without it


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_device_cuda_without_cuda_is_a_one_line_usage_error(capsys):
    from sparse_train.cli import main

    assert main(["bench", "moe-layer", "--device", "cuda", "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: sparse-train bench moe-layer: --device cuda, but torch") and "\n" not in err


def test_unknown_backend_is_a_usage_error(capsys):
    from sparse_train.cli import main

    assert main(["bench", "moe-layer", "--backends", "torch,cublas"]) == 2
    assert "--backends needs one or more of auto, triton, torch, grouped_mm, reference" in capsys.readouterr().err
