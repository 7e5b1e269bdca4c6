"""`sparse-train plan`: a request it cannot answer gets one line naming the problem (and, where it
can, the largest batch or the smallest cluster that would do), before any probe runs; a tiny
model's plan ranks layouts that fit first, fastest first, and explains any of them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sparse_train.cli import main

TINY = ["--config", "configs/tiny-moe.yaml"]
CLUSTER = ["--gpus", "4", "--gpus-per-node", "4", "--gpu", "h100", "--global-batch-tokens", str(128 * 32)]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gpus", "8", "--gpu", "v100"], "--gpu v100: unknown GPU; known: h100"),
        (["--gpus", "8", "--gpu", "custom"], "--gpu custom needs --gpu-spec FILE"),
        (["--gpus", "12", "--gpu", "h100"], "--gpus 12 is not a whole number of 8-GPU nodes"),
        (["--gpus", "8", "--gpu", "h100", "--skew", "-1"], "--skew must be >= 0"),
        (
            ["--gpus", "8", "--gpu", "h100", "--global-batch-tokens", "1000"],
            "not a whole number of 128-token sequences; the largest below that is: 896",
        ),
    ],
)
def test_impossible_requests_get_one_line(capsys, args, message):
    assert main(["plan", *TINY, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def _plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sparse_train", "plan", *TINY, "--set", "moe.kernel_backend=torch", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow  # probes: a fake-CUDA child process
def test_a_plan_ranks_fitting_layouts_fastest_first_and_explains_one():
    proc = _plan(*CLUSTER, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"layout", "fits", "reason", "peak_mem_gb_per_rank", "step_time_s", "tokens_per_s", "mfu"} <= set(rows[0])
    fitting = [r for r in rows if r["fits"]]
    assert fitting and rows[: len(fitting)] == fitting
    speeds = [r["tokens_per_s"] for r in fitting]
    assert speeds == sorted(speeds, reverse=True)
    assert {r["layout"]["activation_checkpointing"] for r in rows} >= {"none", "all"}
    assert all(r["layout"]["dp_replicate"] * r["layout"]["dp_shard"] * r["layout"]["tp"] * r["layout"]["pp"] == 4
               for r in rows)  # fmt: skip
    explained = _plan(*CLUSTER, "--explain", rows[0]["name"])
    assert explained.returncode == 0, explained.stderr[-2000:]
    breakdown = json.loads(explained.stdout[explained.stdout.index("{") :])
    assert breakdown["name"] == rows[0]["name"] and breakdown["memory_gb_per_stage"]


@pytest.mark.slow
def test_a_model_that_fits_no_layout_says_how_close_it_came(tmp_path):
    from sparse_train.plan.hardware import gpu_spec

    fields = {k: v for k, v in gpu_spec("h100").__dict__.items() if k != "name"}
    small = tmp_path / "gpu.yaml"
    small.write_text("\n".join(f"{k}: {v}" for k, v in {**fields, "memory_gb": 0.004}.items()))
    proc = _plan("--gpus", "2", "--gpus-per-node", "2", "--gpu", "custom", "--gpu-spec", str(small))
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert "no layout of 2 custom GPUs fits this model: the closest" in line and "GB per rank" in line


def test_a_batch_too_small_for_the_cluster_names_the_smallest_that_splits(capsys):
    # one sequence on 64 GPUs: tp=8 x pp=4 (tiny-moe has 4 blocks) leaves 2 data-parallel ranks at the fewest
    args = ["plan", *TINY, "--gpus", "64", "--gpu", "h100", "--global-batch-tokens", str(128)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "splits over no data-parallel degree of 64 GPUs" in err, err
    assert "the smallest that does is 2 sequences (256 tokens)" in err, err
    assert len(err.splitlines()) == 1
