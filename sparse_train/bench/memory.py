"""`sparse-train bench memory`: each rank's memory for a config and layout, measured and predicted.

N local processes (gloo on CPU, as `launch` would start them) build the config's model in its
layout and train a few steps; one JSON object per rank:

  full_param_mb       the whole model's parameters (every rank's shards together)
  shard_param_mb      this rank's parameters (local shards), measured from the tensors
  shard_grad_mb       its gradients, measured when the optimizer step starts
  shard_optim_mb      its AdamW state (exp_avg, exp_avg_sq, step), measured after the last step
  baseline_mb         the same process with the same layout, data and steps but a model of a few
                      thousand parameters and one sequence per rank (`baseline_config`): interpreter,
                      torch, process group, data; measured in the same process before the real
                      model is built, after its steps (`baseline_build_mb`: after its build);
                      `build_over_baseline_mb` = build_peak_mb - baseline_build_mb
  build_peak_mb       peak after building model, optimizer and data (CPU: peak RSS; CUDA: max allocated)
  step_peak_mb        peak after the last step
  predicted_step_mb   baseline_mb + sparse_train.train.memory.predict's training memory
                      (parameters, gradients, AdamW, FSDP2 buffers, activations)
  predicted           the prediction's parts (MB), and `trainer_predicted_step_mb`: the figure the
                      trainer warns with (its own process cost taken from the resident set)

The config's own batch and sequence length are measured (that is the run being planned); set
smaller ones with --set for a quick look. Evaluation, checkpoints, plots and TensorBoard are off.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

from sparse_train.config import Config, compose_config, load_config
from sparse_train.errors import TrainingStopped
from sparse_train.parallel.dims import ParallelDims

# a run that only trains: no evaluation, checkpoints, progress bar, TensorBoard or plots
TRAIN_ONLY = [
    "train.eval_every=0",
    "checkpoint.every=0",
    "checkpoint.save_final=false",
    "logging.progress=false",
    "logging.tensorboard=false",
    "logging.plots=false",
]
QUIET = [*TRAIN_ONLY, "train.log_every=1"]


def bench_config(config: str | None, overrides: list[str], steps: int, nproc: int) -> Config:
    """The measured config (ConfigError on a bad key or value, or a layout that does not fit
    `nproc` processes, before any process starts)."""
    cfg = load_config(config, [*QUIET, *overrides, f"train.steps={steps}"])
    ParallelDims.from_config(cfg.parallel, nproc).check_model(cfg)
    return cfg


def baseline_config(cfg: Config, nproc: int) -> Config:
    """The same run with the smallest model its layout accepts: width 2 per attention head, one
    head, dense-FFN unit and expert-hidden unit per TP rank, one block per pipeline stage, one
    routed expert (FFF leaf) per EP rank (at least top_k, and as many as group-limited routing
    needs), and one sequence per data-parallel
    rank and micro-batch: the logits of a large vocabulary, which the prediction counts, would
    otherwise be counted here as well (one sequence's, seq_len x vocab x ~12 bytes, still are).
    The sequence length stays: the sampler's window permutation (8 bytes per window of seq_len
    tokens) is part of the process's fixed cost. The embedding and output projection of vocab x
    d_model are a few thousand parameters."""
    dims = ParallelDims.from_config(cfg.parallel, nproc)
    data = cfg.to_dict()
    tp, ep = dims.tp, dims.ep
    data["model"].update(d_model=2 * tp, n_heads=tp, n_kv_heads=None, n_layers=dims.pp, ffn_hidden=tp, sparse_every_n=1)
    data["model"]["sparse_layers"] = None
    experts = ep * math.ceil(max(cfg.router.top_k, ep) / ep)
    if cfg.router.num_groups is not None:  # group-limited routing: top_k / group_top_k experts per group
        groups = cfg.router.num_groups
        step = math.lcm(groups, ep)
        experts = step * math.ceil(max(experts, groups * cfg.router.top_k // cfg.router.group_top_k) / step)
    data["moe"].update(num_experts=experts, expert_hidden=tp, shared_expert_hidden=tp)
    depth = max(1, math.ceil(math.log2(max(ep, cfg.fff.top_k))))
    data["fff"].update(depth=depth, leaf_width=tp, master_leaf_width=tp)
    data["train"]["batch_size"] = dims.dp
    return compose_config(data)


def _measure(
    cfg: Config, run_dir: str, data: Any = None, *, keep_process_group: bool = False
) -> tuple[dict[str, Any], Any]:
    """Build the trainer (on `data` when given), train cfg.train.steps steps on this rank, and
    read its memory; the result and the trainer's data. `keep_process_group`: leave the process
    group to the next trainer of this process (which reuses an initialised one)."""
    from sparse_train.train import memory
    from sparse_train.train.trainer import Trainer

    warnings: list[str] = []
    log = lambda msg: warnings.append(msg) if msg.startswith("warning") else None  # noqa: E731
    trainer = Trainer(cfg, Path(run_dir), log=log, data=data)
    try:
        prediction = trainer.check_memory()
        build = trainer.build_peak_mb
        grads: list[int] = []
        trainer.optimizer.register_step_pre_hook(
            lambda opt, *_: grads.append(
                memory.local_bytes(p.grad for p in trainer.model.parameters() if p.grad is not None)
            )
        )
        for _ in range(cfg.train.steps):
            trainer.train_step()
        params = list(trainer.model.parameters())
        state = [v for s in trainer.optimizer.state.values() for v in s.values() if hasattr(v, "numel")]
        result = {
            "rank": trainer.rank,
            "layout": trainer.layout(),
            "params_total": trainer.params["total"],
            "param_bytes": params[0].element_size() if params else 4,
            "shard_param_mb": memory.local_bytes(params) / memory.MB,
            "shard_grad_mb": max(grads, default=0) / memory.MB,
            "shard_optim_mb": memory.local_bytes(state) / memory.MB,
            "build_peak_mb": build,
            "step_peak_mb": memory.peak_mb(trainer.device),
            "prediction": prediction,
            "device": str(trainer.device),
            "warnings": warnings,
        }
        return result, trainer.data
    finally:
        trainer.metrics.close()
        if keep_process_group:
            # A second init_process_group on the same address races the first one's teardown
            # (a fast rank reaches the old store before rank 0 has closed it, and the new
            # group hangs: seen with 8 ranks). Without a runtime, close() closes only the log.
            trainer.runtime = None
        trainer.close()


def _measure_baseline_then_run(baseline: Config, cfg: Config, run_dir: str) -> tuple[dict, dict]:
    """In one process: the baseline run first, then the measured one. A peak never falls, so the
    baseline's is read before the real model exists; the real build's peak is then the larger of
    the two (what the process has needed so far). The data, part of the baseline, is loaded
    once and handed to the measured run (same corpus, tokenizer and split). One process per rank
    instead of two halves the start-up cost (importing torch on every rank)."""
    import gc

    import torch

    first, data = _measure(baseline, str(Path(run_dir) / "baseline"), keep_process_group=True)
    gc.collect()  # the baseline's model and optimizer are gone before the real build
    if torch.cuda.is_available() and first["device"].startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return first, _measure(cfg, str(Path(run_dir) / "run"), data)[0]


def launch(nproc: int, baseline: Config, cfg: Config, timeout: float) -> list[tuple[dict, dict]]:
    """Both runs on `nproc` fresh local processes; a failed rank is one line (TrainingStopped)."""
    from sparse_train.launch.local import run_ranks

    with tempfile.TemporaryDirectory() as tmp:
        try:
            return run_ranks(_measure_baseline_then_run, nproc, baseline, cfg, tmp, timeout=timeout)
        except AssertionError as err:  # run_ranks: a rank's traceback, or ranks that never reported
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            raise TrainingStopped(f"bench memory on {_processes(nproc)} failed: {lines[-1]}") from None


def _processes(n: int) -> str:
    return f"{n} process" if n == 1 else f"{n} processes"


def _row(run: dict[str, Any], baseline: dict[str, Any], cfg: Config, nproc: int) -> dict[str, Any]:
    p = run["prediction"]
    training_mb = p.step_mb - p.baseline_mb
    predicted = baseline["step_peak_mb"] + training_mb
    full = run["params_total"] * run["param_bytes"] / 2**20
    return {
        "rank": run["rank"],
        "layout": run["layout"],
        "world_size": nproc,
        "device": run["device"],
        "precision": cfg.train.precision,
        "params_total": run["params_total"],
        "batch_size": cfg.train.batch_size,
        "seq_len": cfg.data.seq_len,
        "grad_accum": cfg.train.grad_accum,
        "steps": cfg.train.steps,
        "full_param_mb": round(full, 1),
        "shard_param_mb": round(run["shard_param_mb"], 1),
        "shard_grad_mb": round(run["shard_grad_mb"], 1),
        "shard_optim_mb": round(run["shard_optim_mb"], 1),
        "baseline_mb": round(baseline["step_peak_mb"], 1),
        "baseline_build_mb": round(baseline["build_peak_mb"], 1),
        "baseline_params": baseline["params_total"],
        "build_peak_mb": round(run["build_peak_mb"], 1),
        "step_peak_mb": round(run["step_peak_mb"], 1),
        "predicted_step_mb": round(predicted, 1),
        "step_over_predicted": round(run["step_peak_mb"] / predicted, 3),
        "build_over_baseline_mb": round(run["build_peak_mb"] - baseline["build_peak_mb"], 1),
        "predicted": {
            "params_mb": round(p.params_mb, 1),
            "grads_mb": round(p.grads_mb, 1),
            "optimizer_mb": round(p.optimizer_mb, 1),
            "fsdp_buffers_mb": round(p.fsdp_buffers_mb, 1),
            "activations_mb": round(p.activations_mb, 1),
            "optimizer_step_mb": round(p.optimizer_step_mb, 1),
            "trainer_predicted_step_mb": round(p.step_mb, 1),
        },
        "warnings": run["warnings"],
    }


COLUMNS = ["rank", "shard_param_mb", "baseline_mb", "build_peak_mb", "step_peak_mb", "predicted_step_mb"]


def run(
    config: str | None, overrides: list[str], nproc: int, *, steps: int, timeout: float, as_json: bool
) -> list[dict[str, Any]]:
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    cfg = bench_config(config, overrides, steps, nproc)
    log(f"{_processes(nproc)}: {steps} steps of a minimal model in the same layout, then of {config or 'the defaults'}")
    rows = [
        _row(run, baseline, cfg, nproc) for baseline, run in launch(nproc, baseline_config(cfg, nproc), cfg, timeout)
    ]
    for row in rows:
        print(json.dumps(row), flush=True)
    if not as_json:
        log(f"{rows[0]['layout']}, {rows[0]['params_total']:,} parameters, {cfg.train.precision}")
        log(" | ".join(COLUMNS))
        for row in rows:
            log(" | ".join(str(row[c]) for c in COLUMNS))
        for warning in {w for row in rows for w in row["warnings"]}:
            log(warning)
    return rows
