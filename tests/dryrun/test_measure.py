"""A dry run measures a rank's train step: peak memory by kind and FLOPs, on fake tensors. A rank
of dp_shard=2 has half the FLOPs of the same step run for real in one CPU process, and its
parameters' bytes are those of its own shards."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import tempfile
    from torch.utils.flop_counter import FlopCounterMode
    from sparse_train.dryrun.run import dry_run, synthetic_data
    from sparse_train.train.trainer import Trainer
    from tests.conftest import tiny_config

    overrides = json.loads(sys.argv[1])
    report = dry_run(tiny_config(*overrides, "parallel.dp_shard=2"), 2, 0, device="cpu", measure=True, phases_to_run=3)
    cfg = tiny_config(*overrides, "train.device=cpu", "logging.tensorboard=false", "logging.plots=false")
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, Path(run_dir), data=synthetic_data(cfg.data.seq_len, 64), log=lambda m: None)
        trainer.train_step(report=False)
        counter = FlopCounterMode(display=False)
        with counter:
            trainer.train_step(report=False)
        real = counter.get_total_flops()
        trainer.close()
    calls = report.collective_calls["train step"]
    whole = sum(p.numel() for p in trainer.model.parameters())
    print(json.dumps({"report": report.as_dict(), "real_flops": real, "whole": whole,
                      "ranks": sorted({r for c in calls for r in c.ranks})}))
    """
)


@pytest.mark.parametrize("ffn", ["moe", "dense"])
def test_the_measured_step_has_the_real_steps_flops_and_the_ranks_parameter_bytes(ffn):
    from sparse_train.dryrun.fake_cuda import preload_environment

    overrides = [f"model.ffn={ffn}", "moe.kernel_backend=torch", "train.batch_size=4"]
    child = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(overrides)],
        env=preload_environment(8),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    out = json.loads(child.stdout.strip().splitlines()[-1])
    report, cost = out["report"], out["report"]["step_cost"]
    assert report["phases"] == ["build", "first step", "train step"], report
    # rank 0 of dp_shard=2 runs half the tokens of the one-process step
    assert cost["flops"] > 0 and 2 * cost["flops"] == out["real_flops"]
    # its fp32 parameter shards on the device (plus, at the peak, the blocks FSDP has gathered
    # whole), and Adam's two moments of each shard
    assert cost["peak_bytes"]["Parameter"] >= 4 * report["local_parameters"]
    assert cost["peak_bytes"]["Optstate"] >= 2 * 4 * report["local_parameters"]
    assert cost["peak_bytes"]["Activation"] > 0 and cost["peak_bytes"]["Total"] >= cost["peak_bytes"]["Parameter"]
    # every collective of the step is between the two ranks; FSDP gathers every parameter (fp32)
    assert out["ranks"] == [0, 1]
    gathered = report["collective_bytes"]["train step"]["c10d::_allgather_base_"]
    assert gathered >= 4 * out["whole"]


@pytest.mark.slow  # 20 s; the fast suite measures through dry_run above, the planner's tests under tp=2 too
def test_the_cli_prints_the_measured_step_under_tensor_and_expert_parallelism():
    argv = ["dry-run", "--config", "configs/tiny-deepseek-v3.yaml", "--world", "4", "--rank", "0", "--measure",
            "--set", "parallel.ep=2", "--set", "parallel.tp=2", "--set", "train.batch_size=8", "--json"]  # fmt: skip
    child = subprocess.run([sys.executable, "-m", "sparse_train", *argv], capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert report["ok"] and report["step_cost"]["flops"] > 0 and report["step_cost"]["peak_bytes"]["Total"] > 0
    step = report["collective_bytes"]["train step"]
    assert step["c10d::alltoall_base_"] > 0  # the MoE dispatch
    assert step["_c10d_functional::all_reduce"] > 0  # tensor parallelism's (a functional op: its group by name)


def test_counting_flops_does_not_keep_a_checkpointed_blocks_recomputation_alive(tmp_path):
    # Real CPU tensors, one process: each block's whole forward is larger than the rest of the
    # step (wide FFNs, few parameters), so a step that recomputes every block peaks well below
    # one that keeps them. With FlopCounterMode's module tracker the recomputed tensors stayed
    # alive to the step's end and the checkpointed step measured above the kept one.
    from pathlib import Path

    from sparse_train.config import load_config
    from sparse_train.dryrun.measure import StepCost, measured_step
    from sparse_train.train.trainer import Trainer

    peaks = {}
    for mode in ("none", "all"):
        overrides = ["model.d_model=32", "model.n_layers=4", "model.ffn_hidden=512", "data.seq_len=128",
                     "model.max_seq_len=128", "train.batch_size=4", "logging.tensorboard=false",
                     "logging.plots=false", "logging.progress=false",
                     f"train.activation_checkpointing={mode}"]  # fmt: skip
        trainer = Trainer(load_config("configs/tiny-dense.yaml", overrides), Path(tmp_path / mode), log=lambda m: None)
        try:
            trainer.train_step(report=False)  # the optimizer's state exists before the measured step
            cost = StepCost()
            with measured_step(trainer, "cpu", cost):
                trainer.train_step(report=False)
            peaks[mode] = cost.peak_bytes
            assert cost.flops > 0
        finally:
            trainer.close()
    assert peaks["all"]["Total"] < 0.6 * peaks["none"]["Total"], peaks
