"""`sparse-train launch --ray`: the same command on N Ray workers, through Ray Train's TorchTrainer.

Ray places the workers (a placement group: PACK by default, SPREAD / STRICT_SPREAD to put them
on different nodes), starts torch.distributed among them (gloo on CPU, NCCL with GPUs) and,
with `--max-failures K`, restarts the whole worker group up to K times when a worker or node
dies; the restarted workers run the command again with `--resume auto`, i.e. from the newest
complete checkpoint. Each worker runs the `train` request in-process, so a Ray
job trains exactly what torchrun would: both start training through launch/train_entry.py.

The run directory must be on storage every node reaches (a shared filesystem): every rank
writes its checkpoint shards there, and Ray keeps its own run records under RUN_DIR/ray. The
driver shows progress from RUN_DIR/metrics.jsonl and rank 0's log (RUN_DIR/logs/rank0.log),
which rank 0 writes, rather than streaming every worker's console. Without `--address` the
driver starts a local Ray instance, so the same command works on a laptop.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparse_train.config import load_config
from sparse_train.errors import LaunchError
from sparse_train.launch.train_entry import TrainRequest
from sparse_train.train.metrics import METRICS_FILE, read_metrics

PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
FORWARDED_ENV = ("SPARSE_TRAIN_FAIL_AT", "SPARSE_TRAIN_DIST_TIMEOUT", "OMP_NUM_THREADS")


@dataclass
class RayJob:
    num_workers: int
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    address: str | None = None  # None: a local instance; "auto": the cluster on this machine; HOST:PORT
    max_failures: int = 0
    placement: str = "PACK"

    @property
    def cpus(self) -> float:
        return self.num_workers * self.cpus_per_worker

    @property
    def gpus(self) -> float:
        return self.num_workers * self.gpus_per_worker


def import_ray():
    try:
        import ray
        import ray.train  # noqa: F401 - the [train] extra, not only Ray core
    except ImportError:
        raise LaunchError("--ray needs Ray Train: pip install 'sparse_train[ray]'") from None
    return ray


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on a HOST:PORT nothing listens on (ray.init would retry for a minute)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise LaunchError(f"--address must be auto or HOST:PORT, got {address!r}")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise LaunchError(f"cannot reach a Ray cluster at {address}: {err.strerror or err}") from None


def connect(ray, job: RayJob) -> bool:
    """Connect to (or start) Ray; True if this process started a local instance."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if job.address is None:
        available = os.cpu_count() or 1
        if job.cpus > available:
            raise LaunchError(
                f"{job.num_workers} workers x {job.cpus_per_worker:g} CPUs need {job.cpus:g} CPUs; this machine "
                f"has {available} (lower --cpus-per-worker, e.g. 0.5, or pass --address of a cluster)"
            )
        ray.init(num_cpus=available, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        return True
    if job.address != "auto":
        check_reachable(job.address)
    try:
        ray.init(address=job.address, log_to_driver=False, logging_level="ERROR")
    except (ConnectionError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LaunchError(f"cannot connect to the Ray cluster at {job.address}: {first}") from None
    return False


def check_resources(ray, job: RayJob) -> None:
    total = ray.cluster_resources()
    if job.cpus > total.get("CPU", 0):
        raise LaunchError(
            f"{job.num_workers} workers x {job.cpus_per_worker:g} CPUs need {job.cpus:g} CPUs; "
            f"the cluster has {total.get('CPU', 0):g}"
        )
    if job.gpus > total.get("GPU", 0):
        raise LaunchError(
            f"{job.num_workers} workers x {job.gpus_per_worker:g} GPUs need {job.gpus:g} GPUs; "
            f"the cluster has {total.get('GPU', 0):g}"
        )
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if job.placement == "STRICT_SPREAD" and len(nodes) < job.num_workers:
        raise LaunchError(
            f"--placement STRICT_SPREAD puts each of {job.num_workers} workers on its own node; "
            f"the cluster has {len(nodes)} nodes"
        )


def _worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: the training request, run in this process (torch.distributed is up)."""
    import ray
    import ray.train
    import torch

    from sparse_train.launch.train_entry import TrainRequest, run_training

    os.chdir(config["cwd"])
    os.environ.update(config["env"])
    torch.set_num_threads(config["threads"])
    request = TrainRequest(**config["request"])
    rank = ray.train.get_context().get_world_rank()
    logs = Path(request.resolved_run_dir()) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with (logs / f"rank{rank}.log").open("a", encoding="utf-8") as fh:  # which node holds which rank
        fh.write(
            f"{time.strftime('%Y-%m-%d %H:%M:%S')} rank {rank}: Ray node {ray.get_runtime_context().get_node_id()}"
            f" ({socket.gethostname()})\n"
        )
    run_training(request)


class _Progress:
    """Follows rank 0's metrics and log in the run directory: a progress bar and its log lines."""

    def __init__(self, run_dir: Path, total_steps: int) -> None:
        self.run_dir, self.total = run_dir, total_steps
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)

    def __enter__(self) -> _Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _follow(self) -> None:
        from tqdm import tqdm

        log_pos = 0
        with tqdm(total=self.total, desc="train (ray)", unit="step", file=sys.stderr, dynamic_ncols=True) as bar:
            while True:
                stopping = self._stop.is_set()
                log = self.run_dir / "logs" / "rank0.log"
                if log.is_file():
                    with log.open(encoding="utf-8", errors="replace") as fh:
                        fh.seek(log_pos)
                        for line in fh.read().splitlines():
                            bar.write(line, file=sys.stderr)
                        log_pos = fh.tell()
                last = self._last_record()
                if last is not None and min(int(last["step"]), self.total) != bar.n:  # a restart may go back
                    bar.n = min(int(last["step"]), self.total)
                    if "loss" in last:
                        bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last.get('tokens_per_s', 0):,.0f}")
                    bar.refresh()
                if stopping:
                    return
                self._stop.wait(1.0)

    def _last_record(self) -> dict | None:
        if not (self.run_dir / METRICS_FILE).is_file():
            return None
        records = read_metrics(self.run_dir)
        return records[-1] if records else None


def run(job: RayJob, request: TrainRequest) -> int:
    """Train as `request` asks on the job's workers; 0 on success, 1 if the job failed."""
    ray = import_ray()
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from sparse_train.parallel.runtime import process_group_backend

    # Every worker and the driver must agree on the run directory (the driver follows its metrics).
    run_dir = request.resolved_run_dir().resolve()
    request = dataclasses.replace(request, run_dir=run_dir)
    total_steps = load_config(request.config, request.overrides).train.steps
    started_local = connect(ray, job)
    try:
        check_resources(ray, job)
        resources = {"CPU": job.cpus_per_worker, **({"GPU": job.gpus_per_worker} if job.gpus_per_worker else {})}
        config = {
            "request": dataclasses.asdict(request),
            "cwd": os.getcwd(),
            "env": {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ},
            "threads": max(1, int(job.cpus_per_worker)),
        }
        trainer = TorchTrainer(
            _worker,
            train_loop_config=config,
            # the groups sparse_train starts itself under torchrun (decision 45)
            torch_config=TorchConfig(backend=process_group_backend("cuda" if job.gpus_per_worker else "cpu")),
            scaling_config=ScalingConfig(
                num_workers=job.num_workers,
                use_gpu=bool(job.gpus_per_worker),
                resources_per_worker=resources,
                placement_strategy=job.placement,
            ),
            run_config=RunConfig(
                name=f"sparse-train-{int(time.time())}",
                storage_path=str(run_dir / "ray"),
                failure_config=FailureConfig(max_failures=job.max_failures),
            ),
        )
        with _Progress(run_dir, total_steps):
            result = trainer.fit()
    except Exception as err:  # noqa: BLE001 - Ray wraps worker errors in its own types
        message = str(err).strip().splitlines()
        print(f"error: the Ray job failed: {message[-1] if message else type(err).__name__}", file=sys.stderr)
        return 1
    finally:
        if started_local:
            ray.shutdown()
    if result.error is not None:
        print(f"error: the Ray job failed: {str(result.error).strip().splitlines()[-1]}", file=sys.stderr)
        return 1
    print(summary(run_dir, job))
    return 0


def summary(run_dir: Path, job: RayJob) -> str:
    from sparse_train.train import checkpoint as ckpt

    records = read_metrics(run_dir)
    losses = [r for r in records if "loss" in r]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    newest = ckpt.list_checkpoints(run_dir / "checkpoints")
    lines = [f"trained {losses[-1]['step'] if losses else 0} steps on {job.num_workers} Ray workers"]
    if losses:
        lines.append(f"  loss          {losses[0]['loss']:.4f} (first step) -> {losses[-1]['loss']:.4f} (last step)")
    if vals:
        lines.append(f"  val loss      {vals[-1]:.4f}")
    lines.append(f"  metrics       {run_dir / METRICS_FILE}")
    lines.append(f"  logs          {run_dir / 'logs'} (one file per rank)")
    if newest:
        lines.append(f"  checkpoint    {newest[0].path}")
    return "\n".join(lines)
