"""`sparse-train launch --ray`: a local Ray instance and a two-node cluster on this host run the
same training as torchrun, a killed worker is restarted by Ray and the run resumes exactly, and
bad requests get one-line errors before anything starts."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from sparse_train.cli import main
from sparse_train.launch.local import free_port
from tests.distributed.restarts import SETS, assert_same_run, reference_run

BIN = Path(sys.executable).parent
RAY_ENV = {"RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}  # token auth once ~/.ray/auth_token exists
os.environ.update(RAY_ENV)


def _ray_launch(run: Path, *launch_args: str, fail_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **RAY_ENV, "OMP_NUM_THREADS": "1"}
    env.pop("SPARSE_TRAIN_FAIL_AT", None)
    if fail_at:
        env["SPARSE_TRAIN_FAIL_AT"] = fail_at
    argv = [
        str(BIN / "sparse-train"),
        "launch",
        "--ray",
        "--num-workers",
        "2",
        *launch_args,
        "train",
        "--run-dir",
        str(run),
        "--resume",
        "auto",
        *SETS,
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=900, env=env)


@pytest.fixture(scope="module")
def torchrun_reference(tmp_path_factory) -> Path:
    return reference_run(tmp_path_factory)


def _nodes_of_ranks(run: Path) -> dict[int, str]:
    nodes = {}
    for rank in (0, 1):
        found = re.findall(r"rank \d+: Ray node (\w+)", (run / "logs" / f"rank{rank}.log").read_text())
        nodes[rank] = found[-1]
    return nodes


@pytest.mark.slow
def test_a_killed_ray_worker_is_restarted_and_the_run_ends_as_if_never_interrupted(tmp_path, torchrun_reference):
    pytest.importorskip("ray.train")
    run = tmp_path / "run"
    done = _ray_launch(run, "--max-failures", "1", fail_at="5:1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert list(run.glob(".injected-failure-*")), "the failure was injected"
    assert "resumed from" in done.stderr and "step_00000003" in done.stderr, "the driver shows rank 0's log"
    assert "trained 8 steps on 2 Ray workers" in done.stdout
    assert_same_run(run, torchrun_reference)  # the same losses and weights as an uninterrupted torchrun job


@pytest.mark.slow
def test_a_two_node_ray_cluster_on_this_host_trains_across_both_nodes(tmp_path, torchrun_reference):
    pytest.importorskip("ray.train")
    port = free_port()
    env = {**os.environ, **RAY_ENV}
    ray = str(BIN / "ray")
    short = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # Ray's socket paths must fit AF_UNIX's 107 bytes
    try:
        for i, extra in enumerate([["--head", "--port", str(port)], ["--address", f"127.0.0.1:{port}"]]):
            done = subprocess.run(
                [
                    ray,
                    "start",
                    *extra,
                    "--node-ip-address",
                    "127.0.0.1",
                    "--num-cpus",
                    "1",
                    "--temp-dir",
                    str(short / f"n{i}"),
                    "--disable-usage-stats",
                ],
                capture_output=True,
                text=True,
                timeout=180,
                env=env,
            )
            assert done.returncode == 0, done.stderr[-2000:]
        run = tmp_path / "run"
        done = _ray_launch(run, "--address", f"127.0.0.1:{port}", "--placement", "STRICT_SPREAD")
        assert done.returncode == 0, done.stderr[-3000:]
        nodes = _nodes_of_ranks(run)
        assert nodes[0] != nodes[1], f"STRICT_SPREAD put both ranks on one node: {nodes}"
        assert_same_run(run, torchrun_reference)  # it trained and checkpointed, exactly as one host does
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert max(r["step"] for r in records) == 8
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, timeout=120, env=env)
        shutil.rmtree(short, ignore_errors=True)


def test_launch_ray_errors_are_one_line(tmp_path, capsys, monkeypatch):
    base = ["launch", "--ray", "--num-workers", "2"]
    train = ["train", "--run-dir", str(tmp_path / "run"), *SETS]
    cases = [
        (base + ["--max-failures", "1"] + train, "the command must be train ... --resume auto"),
        (base[:2] + train, "--num-workers >= 1"),
        (["launch", "--ray", "--num-workers", "3"] + train, "parallel.ep: must divide"),
        (["launch"] + train, "--nproc-per-node is required"),
    ]
    try:
        import ray.train  # noqa: F401

        port = free_port()  # nothing listens there
        cases += [
            (base + ["--address", f"127.0.0.1:{port}"] + train, f"cannot reach a Ray cluster at 127.0.0.1:{port}"),
            (base + ["--cpus-per-worker", "64"] + train, "2 workers x 64 CPUs need 128 CPUs; this machine has"),
        ]
    except ImportError:
        pass
    capsys.readouterr()
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray not installed
    assert main(base + train) == 2
    err = capsys.readouterr().err
    assert "pip install 'sparse_train[ray]'" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists(), "nothing was started or written"


def test_a_cluster_too_small_for_the_job_is_refused_by_name():
    from types import SimpleNamespace

    from sparse_train.launch.ray_launch import LaunchError, RayJob, check_resources

    cluster = SimpleNamespace(
        cluster_resources=lambda: {"CPU": 8.0, "GPU": 2.0},
        nodes=lambda: [{"Alive": True}, {"Alive": True}, {"Alive": False}],
    )
    check_resources(cluster, RayJob(2, cpus_per_worker=4, gpus_per_worker=1, placement="STRICT_SPREAD"))  # fits
    for job, message in [
        (RayJob(3, cpus_per_worker=4), "3 workers x 4 CPUs need 12 CPUs; the cluster has 8"),
        (RayJob(4, cpus_per_worker=1, gpus_per_worker=1), "4 workers x 1 GPUs need 4 GPUs; the cluster has 2"),
        (
            RayJob(3, cpus_per_worker=1, placement="STRICT_SPREAD"),
            "each of 3 workers on its own node; the cluster has 2",
        ),
    ]:
        with pytest.raises(LaunchError, match=message):
            check_resources(cluster, job)
