from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from sparse_train.bench.measure import interleaved_median_ms, peak_activation_mb
from sparse_train.bench.moe_layer import SHAPES, Shape, bench_shape, build_problem, dense_equivalent, hf_mixtral_block
from sparse_train.models.experts import SwiGLU

REQUIRED_KEYS = {
    "shape",
    "ours_ms",
    "dense_ms",
    "ratio_vs_dense",
    "hf_mixtral_ms",
    "speedup_vs_hf",
    "max_abs_diff_vs_hf",
    "peak_mem_mb_ours",
    "peak_mem_mb_dense",
    "deepspeed_ms",
    "speedup_vs_deepspeed",
}
TINY = Shape("tiny", tokens=48, d_model=32, num_experts=4, top_k=2, expert_hidden=16)


def test_dense_equivalent_has_the_active_parameters_and_computes_the_top_k_experts_sum():
    layer, x, _ = build_problem(TINY, 0, torch.device("cpu"))
    dense = dense_equivalent(layer, TINY)
    active = sum(p[0].numel() for p in layer.experts.parameters()) * TINY.top_k
    assert sum(p.numel() for p in dense.parameters()) == active
    # dense(x) equals the unweighted sum of experts 0..k-1, by construction of its weights
    x2 = x[0, :5]
    want = sum(layer.experts.expert_forward(e, x2) for e in range(TINY.top_k))
    torch.testing.assert_close(dense(x2), want, rtol=1e-5, atol=1e-5)


def test_hf_block_gets_identical_weights_and_the_difference_can_fail():
    pytest.importorskip("transformers")
    layer, x, _ = build_problem(TINY, 0, torch.device("cpu"))
    block = hf_mixtral_block(layer, TINY)
    with torch.no_grad():
        ours, _ = layer(x)
        assert float((block(x) - ours).abs().max()) <= 1e-5
        layer.experts.w_down[1] += 0.1  # a real comparison notices a changed expert
        ours_changed, _ = layer(x)
        assert float((block(x) - ours_changed).abs().max()) > 1e-3


@pytest.mark.parametrize("name", ["mixtral-like", "fine-grained"])
def test_benchmark_outputs_have_unit_scale_so_an_absolute_difference_means_something(name):
    # max_abs_diff_vs_hf is an absolute bound: with outputs of size ~100 (a fan-in scaled on the
    # wrong dim) fp32 rounding alone exceeds it, and with outputs of ~1e-3 any bug passes it.
    shape = Shape(**{**SHAPES[name].__dict__, "tokens": 256})
    layer, x, _ = build_problem(shape, 0, torch.device("cpu"))
    with torch.no_grad():
        y, _ = layer(x)
    assert 0.1 < float(y.std()) < 10


def test_skewed_shape_sends_half_the_tokens_to_expert_0():
    skewed = Shape(**{**SHAPES["skewed"].__dict__, "tokens": 256})
    layer, x, _ = build_problem(skewed, 0, torch.device("cpu"))
    with torch.no_grad():
        routing = layer.route(x[0])
    first_choice = routing.experts_Tk[:, 0]
    assert float((first_choice == 0).float().mean()) == pytest.approx(0.5, abs=0.02)


def test_bench_shape_reports_every_key_consistently():
    pytest.importorskip("transformers")
    result = bench_shape(TINY, repeats=1, warmup=0, seed=0, peers={"hf"}, log=lambda m: None)
    assert REQUIRED_KEYS - {"deepspeed_ms", "speedup_vs_deepspeed"} <= set(result)
    assert result["ratio_vs_dense"] == pytest.approx(result["ours_ms"] / result["dense_ms"], rel=1e-3)
    hf_times = [result[k] for k in ("hf_eager_ms", "hf_grouped_mm_ms", "hf_batched_mm_ms") if result.get(k)]
    assert result["hf_mixtral_ms"] == min(hf_times)
    assert result["speedup_vs_hf"] == pytest.approx(result["hf_mixtral_ms"] / result["ours_ms"], rel=1e-3)
    assert result["max_abs_diff_vs_hf"] <= 1e-5
    assert result["peak_mem_mb_ours"] > 0 and result["peak_mem_mb_dense"] > 0


@pytest.mark.slow
def test_cli_prints_one_json_object_per_shape_with_deepspeed():
    pytest.importorskip("deepspeed")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sparse_train",
            "bench",
            "moe-layer",
            "--json",
            "--tokens",
            "64",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--shapes",
            "mixtral-like",
            "skewed",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["shape"] for r in rows] == ["mixtral-like", "skewed"]
    for row in rows:
        assert REQUIRED_KEYS <= set(row)
        assert row["deepspeed_ms"] is not None, row.get("deepspeed_error")
        assert row["speedup_vs_deepspeed"] == pytest.approx(row["deepspeed_ms"] / row["ours_ms"], rel=1e-3)


def test_bad_bench_arguments_exit_2(capsys):
    from sparse_train.cli import main

    assert main(["bench", "moe-layer", "--peers", "megablocks"]) == 2
    assert "unknown --peers ['megablocks']" in capsys.readouterr().err


def test_peak_activation_memory_counts_saved_activations_not_gradients():
    torch.manual_seed(0)
    ffn = SwiGLU(64, 256)
    x = torch.randn(512, 64)

    def step():
        ffn(x).sum().backward()

    peak = peak_activation_mb(step, ffn.parameters())
    one = 512 * 256 * 4 / 2**20  # one [512, 256] fp32 activation
    # autograd keeps gate, up, silu(gate) and their product: at least 4 activations, and the
    # parameter gradients (3 * 64 * 256 floats) are not counted
    assert 4 * one <= peak <= 12 * one


class FakeClock:
    """A clock in seconds that moves only when a fake candidate says its call took so long."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def candidate(self, durations_ms: list[float], calls: list[str], name: str):
        """A candidate whose successive calls take `durations_ms` (warmup calls included)."""
        remaining = iter(durations_ms)

        def run() -> None:
            calls.append(name)
            self.now += next(remaining) / 1e3

        return run


def test_interleaved_median_is_the_median_of_known_timings_taken_in_turns():
    clock, calls = FakeClock(), []
    # One warmup call each (a huge 100 ms that must not count), then three timed rounds. The
    # medians (3 and 5) sit at different positions of the rounds and differ from the means
    # (3.67, 5.33), the minima and the maxima, so only a median reports both.
    a = clock.candidate([100.0, 7.0, 3.0, 1.0], calls, "a")
    b = clock.candidate([100.0, 2.0, 9.0, 5.0], calls, "b")
    times = interleaved_median_ms({"a": a, "b": b}, repeats=3, warmup=1, device=torch.device("cpu"), clock=clock)
    assert calls == ["a", "b", "a", "b", "a", "b", "a", "b"]  # warmup, then rounds in turn
    assert times == {"a": pytest.approx(3.0), "b": pytest.approx(5.0)}


def test_interleaved_median_with_min_round_reports_the_mean_call_of_each_round():
    clock, calls = FakeClock(), []
    # Calibration call: 2 ms, so a 10 ms round holds 5 calls; rounds of 5 x 2 ms, 5 x 4 ms and
    # 5 x 3 ms report 2, 4 and 3 ms per call, whose median is 3.
    per_call = [2.0] * 5 + [4.0] * 5 + [3.0] * 5
    fn = clock.candidate([2.0, *per_call], calls, "a")
    times = interleaved_median_ms(
        {"a": fn}, repeats=3, warmup=0, device=torch.device("cpu"), min_round_ms=10, clock=clock
    )
    assert len(calls) == 1 + 15
    assert times["a"] == pytest.approx(3.0)


DISPATCH_KEYS = {
    "layout",
    "ep",
    "bytes_sent_per_step",
    "bytes_min_per_step",
    "bytes_ratio_vs_min",
    "all_to_all_share",
    "tokens_per_s",
    "single_process_tokens_per_s",
    "speedup_vs_single_process",
    "remote_peers_per_token",
    "all_to_all_call_bytes_per_rank",
    "balanced_routing",
}


@pytest.mark.slow
def test_dispatch_benchmark_reports_bytes_at_the_minimum_with_deduplication():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sparse_train",
            "bench",
            "dispatch",
            "--json",
            "--ep",
            "2",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--compare-no-dedup",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    dedup, plain = (json.loads(line) for line in proc.stdout.splitlines())
    assert DISPATCH_KEYS <= set(dedup)
    assert dedup["dedup"] and dedup["bytes_ratio_vs_min"] == 1.0 and dedup["bytes_sent_per_step"] > 0
    # every call's larger buffer: the local block, routing metadata and weights besides the remote rows
    assert sum(dedup["all_to_all_call_bytes_per_rank"]) > dedup["bytes_sent_per_step"]
    assert not plain["dedup"] and plain["bytes_ratio_vs_min"] > 1.0
    assert 0 < dedup["all_to_all_share"] < 1


@pytest.mark.slow
def test_group_limited_routing_sends_a_token_to_at_most_group_top_k_ranks():
    """Groups = the EP ranks (4 groups of 2 experts on 4 ranks), one group per token: a token
    has at most one remote peer; plain top-2 routing of this model averages 1.37 (benchmarks)."""
    base = [sys.executable, "-m", "sparse_train", "bench", "dispatch", "--json", "--ep", "4", "--steps", "3"]
    proc = subprocess.run(
        [*base, "--warmup", "1", "--set", "router.num_groups=4", "--set", "router.group_top_k=1"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (grouped,) = (json.loads(line) for line in proc.stdout.splitlines())
    assert grouped["overrides"] == ["router.num_groups=4", "router.group_top_k=1"]
    assert 0 < grouped["remote_peers_per_token"] <= 1.0


@pytest.mark.slow
def test_balanced_routing_gives_every_rank_the_same_all_to_all_bytes():
    """--balanced-routing: each rank sends and receives T*k rows, so every rank's all-to-all
    calls weigh the same; the router's own split sizes differ from rank to rank."""
    base = [sys.executable, "-m", "sparse_train", "bench", "dispatch", "--json", "--ep", "2", "--steps", "2"]
    proc = subprocess.run([*base, "--warmup", "1", "--balanced-routing"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = (json.loads(line) for line in proc.stdout.splitlines())
    per_rank = row["all_to_all_call_bytes_per_rank"]
    assert row["balanced_routing"] and per_rank[0] > 0 and per_rank == [per_rank[0]] * 2, row


def test_bad_dispatch_bench_arguments_exit_2(capsys):
    from sparse_train.cli import main

    assert main(["bench", "dispatch", "--ep", "1"]) == 2
    assert "--ep >= 2" in capsys.readouterr().err
