"""The GPU dry run: layouts run clean on fake CUDA tensors, and planted GPU-run failures are
found and named (a host read in an unreported step, a CPU tensor sent to a collective).

The dry run needs the fake CUDA library loaded before torch, so each test runs its cases in one
child process started with it preloaded (the same way `sparse-train dry-run` runs itself)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from sparse_train.dryrun.checks import served_devices
from sparse_train.parallel.balanced import balanced_counts

CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.distributed as dist
    from sparse_train.dryrun.run import dry_run
    from sparse_train.train.engine import Engine
    from sparse_train.train.trainer import Trainer
    from tests.conftest import tiny_config

    original = Engine.clip_grad_norm

    def read_the_norm(self, *args, **kwargs):
        norm = original(self, *args, **kwargs)
        float(norm)  # planted: a host read in every step
        return norm

    def reduce_on_the_cpu(self, *args, **kwargs):
        dist.all_reduce(torch.zeros(()))  # planted: a CPU tensor, made in the step, to a collective
        return original(self, *args, **kwargs)

    def tensor_from_python(self, *args, **kwargs):
        norm = original(self, *args, **kwargs)
        return norm * torch.tensor(1.0, device=norm.device)  # planted: host data copied in every step

    def agree_on_the_cpu(self, ok):
        flag = torch.tensor([int(ok)])  # planted: the ranks' agreement of a resume, over a CPU tensor
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    PLANTS = {"host read": read_the_norm, "cpu collective": reduce_on_the_cpu, "host data": tensor_from_python}
    agree = Trainer._all_ranks_agree
    for world, overrides, plant, backend in json.loads(sys.argv[1]):
        Engine.clip_grad_norm = PLANTS.get(plant, original)
        Trainer._all_ranks_agree = agree_on_the_cpu if plant == "cpu agreement" else agree
        print(json.dumps(dry_run(tiny_config(*overrides), world, 0, backend=backend).as_dict()), flush=True)
    """
)

MOE = ["train.batch_size=8", "moe.num_experts=8"]
LAYOUTS = {
    "dp_shard8": (8, [*MOE, "parallel.dp_shard=8"]),
    "ep8": (8, [*MOE, "parallel.dp_shard=8", "parallel.ep=8"]),
    "tp2-ep4": (8, [*MOE, "parallel.dp_shard=4", "parallel.ep=4", "parallel.tp=2"]),
    "pp2-ep4": (8, [*MOE, "parallel.dp_shard=4", "parallel.ep=4", "parallel.pp=2", "model.n_layers=4",
                    "train.grad_accum=2"]),
    "fff-ep8": (8, ["train.batch_size=8", "model.ffn=fff", "parallel.dp_shard=8", "parallel.ep=8"]),
    "ep8-allgather": (8, [*MOE, "parallel.dp_shard=8", "parallel.ep=8", "parallel.ep_dispatcher=allgather"]),
    # routers: a variable selection (masks), the plan's differentiable all-reduce, MoE++'s carried logits
    "ep8-relu": (8, [*MOE, "parallel.dp_shard=8", "parallel.ep=8", "router.type=relu", "router.cls_coef=0.01"]),
    "ep8-selective-sinkhorn": (8, [*MOE, "parallel.dp_shard=8", "parallel.ep=8", "router.type=selective_sinkhorn",
                                   "router.sinkhorn_fraction=1.0"]),
    "pp2-ep4-moe++": (8, [*MOE, "parallel.dp_shard=4", "parallel.ep=4", "parallel.pp=2", "model.n_layers=4",
                          "train.grad_accum=2", "moe.zero_experts=1", "moe.constant_experts=1",
                          "moe.gating_residual=true"]),
}  # fmt: skip
# Capacity-dropping routing on one expert-parallel rank selects the kept assignments with a
# boolean mask: a host sync on a GPU, which the dry run reports (docs/gpu.md, known findings).
CAPACITY_EP1 = (8, [*MOE, "parallel.dp_shard=8", "moe.capacity_factor=1.25"])


def _dry_runs(cases: list[tuple[int, list[str], str | None, str | None]]) -> list[dict]:
    """One report per case (world, overrides, plant, backend: None for the run's own)."""
    from sparse_train.dryrun.fake_cuda import preload_environment

    child = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(cases)],
        env=preload_environment(8),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    return [json.loads(line) for line in child.stdout.splitlines() if line.startswith("{")]


def _assert_clean(report: dict, name: str) -> None:
    assert report["ok"], f"{name}: {report['findings']}"
    assert report["phases"] == [
        "build", "first step", "train step", "reported step", "evaluation", "checkpoint save", "resume", "init from"
    ]  # fmt: skip
    step = report["collectives"]["train step"]
    # the step's gradient norm, at least, and the reported step's metric reductions on top
    assert step.get("c10d::allreduce_", 0) >= 1, step
    assert report["host_reads"].get("train step", 0) == 0 and report["host_reads"]["reported step"] > 0, report


@pytest.mark.slow
def test_expert_parallel_step_is_clean_and_planted_failures_are_named():
    world, overrides = LAYOUTS["ep8"]
    plants = [(None, None), ("host read", None), ("cpu collective", None), ("host data", None)]
    # a pure NCCL backend serves CUDA tensors only; the run's own (cuda:nccl,cpu:gloo) serves CPU ones too
    plants += [(None, "nccl"), ("cpu agreement", "nccl")]
    clean, host_read, cpu_collective, host_data, clean_nccl, cpu_agreement = _dry_runs(
        [(world, overrides, plant, backend) for plant, backend in plants]
    )
    _assert_clean(clean, "ep8")
    assert clean["collectives"]["train step"]["c10d::alltoall_base_"] > 0  # tokens moved between 8 ranks
    assert clean["collectives"]["resume"] == {"c10d::allreduce_": 2}  # the checkpoint verifies, then loads, everywhere

    assert not host_read["ok"]
    assert host_read["findings"] == [
        "train step: host read: aten::_local_scalar_dense at sparse_train/train/trainer.py:"
        + host_read["findings"][0].split("trainer.py:")[1]
    ]
    assert host_read["findings"][0].endswith("in _train_step")

    assert not cpu_collective["ok"]
    in_the_step = {tuple(line.split(": ")[:2]) for line in cpu_collective["findings"] if line.startswith("train step")}
    assert in_the_step == {("train step", "cpu tensor"), ("train step", "collective device")}, cpu_collective
    # a CPU collective is wrong in every step, reported or not; creating the tensor only where unreported
    assert {line.split(": ")[0] for line in cpu_collective["findings"]} == {"first step", "train step", "reported step"}
    assert all("in _train_step" in line for line in cpu_collective["findings"]), cpu_collective["findings"]

    # save, resume and init-from keep every collective on the device (a pure NCCL backend would do);
    # a resume's agreement over a CPU tensor is found there
    _assert_clean(clean_nccl, "ep8 on nccl")
    assert cpu_agreement["phases"][-2:] == ["resume", "init from"]
    assert {line.split(" at ")[0] for line in cpu_agreement["findings"]} == {
        "resume: collective device: c10d::allreduce_ on a cpu tensor"
    }, cpu_agreement["findings"]
    sites = {line.rsplit(" in ", 1)[1] for line in cpu_agreement["findings"]}
    assert sites == {"_find_resume", "load_verified"}, cpu_agreement["findings"]  # where the ranks agree

    assert host_data["findings"] == [
        "train step: cpu tensor: aten::lift_fresh creates a CPU tensor at sparse_train/train/trainer.py:"
        + host_data["findings"][0].split("trainer.py:")[1]
    ], host_data["findings"]


@pytest.mark.slow
def test_every_layout_runs_clean_on_fake_cuda_and_a_masked_selection_is_reported():
    *reports, capacity = _dry_runs(
        [(world, overrides, None, None) for world, overrides in [*LAYOUTS.values(), CAPACITY_EP1]]
    )
    assert len(reports) == len(LAYOUTS)
    for name, report in zip(LAYOUTS, reports, strict=True):
        _assert_clean(report, name)
    assert len(capacity["findings"]) == 1 and capacity["phases"] == ["build"], capacity
    assert capacity["findings"][0].startswith("first step: data-dependent shape: aten.nonzero.default at ")
    assert capacity["findings"][0].endswith("in sort_assignments")
    assert "pp=2" in reports[list(LAYOUTS).index("pp2-ep4")]["layout"]


def test_balanced_counts_split_every_assignment_as_evenly_as_possible():
    assert balanced_counts(5, 2, 4) == [3, 3, 2, 2]
    assert sum(balanced_counts(7, 3, 8)) == 21 and max(balanced_counts(7, 3, 8)) - min(balanced_counts(7, 3, 8)) <= 1


def test_backend_strings_name_the_devices_they_serve():
    assert served_devices("nccl") == {"cuda"}
    assert served_devices("gloo") == {"cpu"}
    assert served_devices("cuda:nccl,cpu:gloo") == {"cuda", "cpu"}


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--world", "0"], "--world and --devices-per-node must be at least 1"),
        (["--world", "8", "--rank", "8"], "--rank 8 is outside the world of 8 ranks"),
        (["--world", "8", "--set", "parallel.ep=3"], "parallel.ep"),
    ],
)
def test_bad_arguments_fail_in_one_line_before_anything_starts(argv, expected, capsys):
    from sparse_train.cli import main

    assert main(["dry-run", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err, err
