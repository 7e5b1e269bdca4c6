"""Running a sweep: every point a normal `sparse-train train` run in its own directory.

    DIR/sweep.json                 the spec's name and digest (a directory serves one spec)
    DIR/trials/<id>/trial.json     the point, its compute, status, losses, wall time, error
    DIR/trials/<id>/run/           the trial's run directory (metrics, checkpoints, logs)
    DIR/trials/<id>/train.log      the trial's console output
    DIR/results.csv                one row per trial, rewritten as trials finish

Trials run as Ray tasks (one CPU each by default; a local Ray instance unless an address is
given) or, with `executor="local"`, as subprocesses on this machine. Running the same sweep
again skips trials whose trial.json says done and runs the others (missing or failed) again;
a trial that fails records its error and the sweep goes on. Each trial runs with `--resume
auto`, so a trial interrupted mid-run continues from its last checkpoint.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparse_train import atomic
from sparse_train.config import Config
from sparse_train.sweeps.flops import compute_of
from sparse_train.sweeps.spec import Point, SweepError, SweepSpec, expand

SWEEP_FILE = "sweep.json"
RESULTS = "results.csv"
FINAL_WINDOW = 5  # final train loss: the mean of the last this many logged train losses
TRIAL_SETS = ["logging.progress=false", "logging.tensorboard=false", "logging.plots=false"]


@dataclass
class Trial:
    point: Point
    compute: dict[str, float]
    directory: Path

    @property
    def record_path(self) -> Path:
        return self.directory / "trial.json"

    def record(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.record_path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    @property
    def done(self) -> bool:
        rec = self.record()
        return rec is not None and rec.get("status") == "done"


def plan(spec: SweepSpec, out: Path) -> list[Trial]:
    """The sweep's trials within the budget (checked against what `out` already holds)."""
    out = Path(out)
    marker = out / SWEEP_FILE
    if marker.is_file():
        held = json.loads(marker.read_text())
        if held.get("digest") != spec.digest:
            raise SweepError(
                f"{out} holds results of another spec ({held.get('name')}, {held.get('spec')}); "
                "use another --out or the spec that made it"
            )
    trials, smallest = [], None
    for point in expand(spec):
        cfg = spec.base_config([*point.set_args()])
        compute = compute_of(cfg).as_dict()
        smallest = compute["flops"] if smallest is None else min(smallest, compute["flops"])
        if spec.budget_flops is None or compute["flops"] <= spec.budget_flops:
            trials.append(Trial(point, compute, out / "trials" / point.trial_id))
    if not trials:
        raise SweepError(f"no point fits budget_flops={spec.budget_flops:.3g}: the smallest needs {smallest:.3g} FLOPs")
    return trials


def _write_marker(spec: SweepSpec, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    marker = out / SWEEP_FILE
    if not marker.is_file():
        info = {"name": spec.name, "digest": spec.digest, "spec": str(spec.path), "created": time.time()}
        marker.write_text(json.dumps(info, indent=1) + "\n")


def trial_command(spec: SweepSpec, trial: Trial) -> list[str]:
    sets = [*spec.sets, *trial.point.set_args(), *TRIAL_SETS]
    argv = [
        sys.executable,
        "-m",
        "sparse_train",
        "train",
        "--config",
        str(spec.base),
        "--run-dir",
        str(trial.directory / "run"),
        "--resume",
        "auto",
    ]
    return [*argv, *(arg for s in sets for arg in ("--set", s))]


def run_trial(argv: list[str], directory: str, threads: int) -> dict[str, Any]:
    """One trial, in a subprocess; its outcome (never raises: a failure is a result)."""
    directory_path = Path(directory)
    directory_path.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.time()
    with (directory_path / "train.log").open("w") as log:
        status = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.time() - started
    if status != 0:
        lines = (directory_path / "train.log").read_text(errors="replace").strip().splitlines()
        return {"status": "failed", "wall_time_s": wall, "error": (lines[-1] if lines else f"exit status {status}")}
    records = [json.loads(line) for line in (directory_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r["lm_loss"] for r in records if "lm_loss" in r]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    return {
        "status": "done",
        "wall_time_s": wall,
        "error": "",
        "final_train_loss": sum(train[-FINAL_WINDOW:]) / len(train[-FINAL_WINDOW:]) if train else None,
        "final_val_loss": val[-1] if val else None,
    }


def _save_record(trial: Trial, outcome: dict[str, Any]) -> None:
    record = {
        "trial_id": trial.point.trial_id,
        "seed": trial.point.seed,
        "values": trial.point.values,
        "overrides": trial.point.overrides,
        **trial.compute,
        **outcome,
    }
    trial.directory.mkdir(parents=True, exist_ok=True)
    atomic.write_text(trial.record_path, json.dumps(record, indent=1, default=str) + "\n")


def sparsity_of(cfg: Config) -> dict[str, Any]:
    """The law's E and G for a trial. Dense: 1 and 1. MoE: the routed experts and ffn_hidden /
    expert_hidden. FFF: the leaves and ffn_hidden / leaf_width, i.e. an FFF counts as a routed
    model of 2^depth experts (the moe law's reading of it is an approximation: its leaves are
    chosen by a tree, not a learned top-k)."""
    m = cfg.model
    if m.ffn == "moe":
        return {"ffn": "moe", "num_experts": cfg.moe.num_experts, "granularity": m.ffn_hidden / cfg.moe.expert_hidden}
    if m.ffn == "fff":
        return {"ffn": "fff", "num_experts": cfg.fff.num_leaves, "granularity": m.ffn_hidden / cfg.fff.leaf_width}
    return {"ffn": m.ffn, "num_experts": 1, "granularity": 1}


def write_results(spec: SweepSpec, trials: list[Trial], out: Path) -> Path:
    """results.csv: one row per trial (not yet run: status pending)."""
    axes = list(spec.axes)
    columns = [
        "trial_id",
        "status",
        "seed",
        *(f"axis:{a}" for a in axes),
        "ffn",
        "num_experts",
        "granularity",
        "params_total",
        "params_active",
        "tokens",
        "flops",
        "final_train_loss",
        "final_val_loss",
        "wall_time_s",
        "error",
    ]
    rows = []
    for trial in trials:
        rec = trial.record() or {"status": "pending"}
        cfg = spec.base_config(trial.point.set_args())
        row = {"trial_id": trial.point.trial_id, "seed": trial.point.seed, **trial.compute, **rec, **sparsity_of(cfg)}
        for axis in axes:
            value = trial.point.values[axis]
            row[f"axis:{axis}"] = json.dumps(value, sort_keys=True) if isinstance(value, dict) else value
        rows.append(row)
    path = Path(out) / RESULTS
    with atomic.writing(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def run_sweep(
    spec: SweepSpec,
    out: Path,
    *,
    executor: str = "ray",
    address: str | None = None,
    max_parallel: int | None = None,
    cpus_per_trial: float = 1.0,
    gpus_per_trial: float = 0.0,
) -> dict[str, int]:
    """Run every trial not yet done; returns counts by status."""
    if gpus_per_trial and executor != "ray":
        raise SweepError("--gpus-per-trial needs the ray executor (Ray assigns each trial its GPUs)")
    from tqdm import tqdm

    out = Path(out)
    trials = plan(spec, out)
    _write_marker(spec, out)
    todo = [t for t in trials if not t.done]
    threads = max(1, int(cpus_per_trial))
    # default: as many trials as this machine's CPUs hold; on Ray, as many as the cluster's do
    parallel = max_parallel or max(1, int((os.cpu_count() or 1) // cpus_per_trial))
    counts = {"done": len(trials) - len(todo), "failed": 0, "running": 0}
    write_results(spec, trials, out)
    bar = tqdm(total=len(trials), initial=counts["done"], desc=f"sweep {spec.name}", unit="trial", file=sys.stderr)

    def finished(trial: Trial, outcome: dict[str, Any]) -> None:
        _save_record(trial, outcome)
        counts["running"] -= 1
        counts["done" if outcome["status"] == "done" else "failed"] += 1
        bar.update(1)
        show()
        write_results(spec, trials, out)

    def show() -> None:
        bar.set_postfix(done=counts["done"], running=counts["running"], failed=counts["failed"])

    try:
        if executor == "local":

            def started(t: Trial) -> dict[str, Any]:
                counts["running"] += 1
                show()
                return run_trial(trial_command(spec, t), str(t.directory), threads)

            with ThreadPoolExecutor(parallel) as pool:
                futures = {pool.submit(started, t): t for t in todo}
                for future in as_completed(futures):
                    finished(futures[future], future.result())
        elif executor == "ray":
            resources = {"num_cpus": cpus_per_trial, "num_gpus": gpus_per_trial}
            _run_on_ray(spec, todo, address, max_parallel, resources, threads, counts, finished, show)
        else:
            raise SweepError(f"unknown executor {executor!r}; allowed: ray, local")
    finally:
        bar.close()
    return {k: v for k, v in counts.items() if k != "running"}


def _run_on_ray(spec, todo, address, parallel, resources, threads, counts, finished, show) -> None:
    from sparse_train.launch.ray_launch import RayJob, check_resources, connect, import_ray

    ray = import_ray()
    # one trial must fit the cluster; Ray queues the rest. Ray sets CUDA_VISIBLE_DEVICES for a
    # task with GPUs, and the trial's subprocess inherits it.
    job = RayJob(1, cpus_per_worker=resources["num_cpus"], gpus_per_worker=resources["num_gpus"], address=address)
    started_local = connect(ray, job)
    try:
        check_resources(ray, job)
        if parallel is None:
            total = ray.cluster_resources()
            fits = [total.get("CPU", 0) // resources["num_cpus"]]
            if resources["num_gpus"]:
                fits.append(total.get("GPU", 0) // resources["num_gpus"])
            parallel = max(1, int(min(fits)))
        task = ray.remote(**resources, max_retries=0)(run_trial)
        pending, running = list(todo), {}
        while pending or running:
            while pending and len(running) < parallel:
                t = pending.pop(0)
                running[task.remote(trial_command(spec, t), str(t.directory), threads)] = t
                counts["running"] += 1
                show()
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                t = running.pop(ref)
                try:
                    outcome = ray.get(ref)
                except Exception as err:  # noqa: BLE001 - a lost task is a failed trial, not a failed sweep
                    outcome = {"status": "failed", "wall_time_s": None, "error": f"Ray task failed: {err}"[:500]}
                finished(t, outcome)
    finally:
        if started_local:
            ray.shutdown()
