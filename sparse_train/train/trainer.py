"""The single-process training loop: forward, loss + aux losses, backward, clip, step, log, save.

Exact resume: everything a step depends on (weights, AdamW moments, schedule position, the
sampler's consumed count, RNG states) is in the checkpoint, so a resumed run reproduces the
losses of an uninterrupted one bit for bit (fp32, CPU).
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from sparse_train.config import Config, ConfigError, compose_config
from sparse_train.data.dataset import TokenData, load_token_data, make_sampler, validation_batches
from sparse_train.data.tokenizer import build_tokenizer
from sparse_train.errors import CheckpointError, OutOfMemory, TrainingStopped
from sparse_train.models.sparse import LOAD_NAMES
from sparse_train.models.transformer import Transformer, count_parameters, materialize
from sparse_train.parallel.runtime import DistributedRuntime, init_distributed
from sparse_train.train import checkpoint as ckpt
from sparse_train.train import faults, memory, sharded
from sparse_train.train.collapse import CollapseWatch
from sparse_train.train.engine import Engine
from sparse_train.train.metrics import MetricsLogger
from sparse_train.train.optim import build_optimizer, build_scheduler, load_scheduler_state
from sparse_train.train.skips import SkipCounts, SkippedSteps
from sparse_train.train.sources import SourceEvaluation, source_records
from sparse_train.train.summary import RunSummary
from sparse_train.train.weights import WeightSource

# Sections a resumed run must share with its checkpoint (the rest may change between runs).
RESUME_MUST_MATCH = ("model", "moe", "router", "fff", "data")


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device", "is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


def resolve_config(cfg: Config, vocab_size: int) -> Config:
    """The config with derived values filled in (vocab size from the tokenizer)."""
    data = cfg.to_dict()
    if data["model"]["vocab_size"] is None:
        data["model"]["vocab_size"] = vocab_size
    elif data["model"]["vocab_size"] < vocab_size:
        raise ConfigError(
            "model.vocab_size", f"must be >= the tokenizer's {vocab_size}, got {data['model']['vocab_size']}"
        )
    return compose_config(data)


def check_init_weights(model: Transformer, weights: WeightSource) -> None:
    """`weights` names exactly the model's tensors, each of its shape (one line naming the first misfit)."""
    expected, shapes = model.state_dict(), weights.shapes()
    missing, extra = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise ConfigError(
            "--init-from", f"the weights do not fit the model ({what}; {len(missing) + len(extra)} in all)"
        )
    for name, shape in shapes.items():
        if shape != tuple(expected[name].shape):
            raise ConfigError("--init-from", f"{name} has shape {shape}, the model {tuple(expected[name].shape)}")


def first_difference(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> str | None:
    for key in sorted(set(a) | set(b)):
        path = f"{prefix}{key}"
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            found = first_difference(va, vb, path + ".")
            if found:
                return found
        elif va != vb:
            return f"{path} (checkpoint {va!r}, config {vb!r})"
    return None


class Trainer:
    _pending_save: ckpt.PendingSave | None = None  # an asynchronous checkpoint being written
    _checkpoint_groups: tuple[Any, Any] | None = None  # its process groups, made at the first one
    memory_prediction: memory.MemoryPrediction | None = None  # set by check_memory, before the first step

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        *,
        resume: str | None = None,
        log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
        data: TokenData | None = None,
        init_weights: WeightSource | None = None,
    ) -> None:
        """`init_weights`: the starting weights of a fresh run (`train --init-from`), instead of
        the seeded initialisation; a resumed run takes its checkpoint's weights instead."""
        self.tokenizer = build_tokenizer(cfg.data)
        self.cfg = resolve_config(cfg, self.tokenizer.vocab_size)
        # Validates the parallel layout before any process group exists, then starts one.
        self.runtime: DistributedRuntime | None = init_distributed(self.cfg, select_device(cfg.train.device))
        self.device = self.runtime.device if self.runtime else select_device(cfg.train.device)
        self.is_main = self.runtime is None or self.runtime.is_main
        self.rank = 0 if self.runtime is None else self.runtime.rank
        self.failure_plan = faults.plan_from_env()  # test-only injected kills (sparse_train.train.faults)
        self._log_file = None
        if self.runtime is not None:
            run_dir = Path(self.runtime.agree(str(run_dir)))  # the main rank's (e.g. timestamped) choice
            log = self._rank_log(run_dir, log)
        self.log = log
        self.run_dir = run_dir
        self.checkpoints_dir = run_dir / "checkpoints"
        resume_path = self._find_resume(resume)

        torch.manual_seed(self.cfg.train.seed)
        random.seed(self.cfg.train.seed)
        self.data = data or load_token_data(self.cfg.data, self.tokenizer, self.cfg.model.vocab_size)
        # Built without storage, split and sharded by the layout, then only this rank's part is
        # allocated and filled: from the seed (the same weights in every layout) or given weights.
        with torch.device("meta"):
            model = Transformer(self.cfg.model, self.cfg.moe, self.cfg.router, self.cfg.fff)
        self.initialised_from_weights = init_weights is not None and resume_path is None
        if self.initialised_from_weights:
            check_init_weights(model, init_weights)
        self.params = count_parameters(model)
        self.engine = Engine(model, self.cfg, self.runtime)
        self.model = self.engine.module  # this rank's part: the model itself on one process
        # Drawn from the seed only when nothing else fills the weights (a checkpoint loads them all).
        fresh = resume_path is None and not self.initialised_from_weights
        materialize(self.model, self.cfg.model, self.device, seed=self.cfg.train.seed if fresh else None)
        if self.initialised_from_weights:
            distributed = self.runtime is not None
            init_weights.load_into(
                self.model, distributed=distributed, partial=distributed and self.runtime.dims.pp > 1
            )
        self.optimizer = build_optimizer(
            self.engine.module, self.cfg.optimizer, node_lr_scale=self.cfg.fff.node_lr_scale
        )
        self.scheduler = build_scheduler(self.optimizer, self.cfg.optimizer, self.cfg.train.steps)
        t = self.cfg.train
        self.sampler = make_sampler(self.data, self.cfg.data.seq_len, t.batch_size, t.seed)
        self.val_batches = validation_batches(self.data.val, self.cfg.data.seq_len, t.batch_size, t.eval_batches)
        # A mixture's sources are evaluated apart, each on its own fixed batches (train/sources.py).
        self.source_val_batches = {
            s.name: validation_batches(s.val, self.cfg.data.seq_len, t.batch_size, t.eval_batches)
            for s in self.data.sources
        }
        self.step = 0
        self.skips = SkippedSteps(self.device)
        self.collapse = CollapseWatch(self.cfg.router, self.log)
        self.nonfinite_total = 0  # as of the last read of self.skips
        if resume_path is not None:
            self._load(resume_path)
        if self.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(self.cfg.to_yaml())
        self.build_peak_mb = memory.peak_mb(self.device)  # the model, optimizer and data in place
        self.peak_memory_mb: dict[str, float] = {}
        # Only the main rank writes metrics; the others' records are the same numbers.
        self.metrics = MetricsLogger(
            run_dir,
            tensorboard=self.cfg.logging.tensorboard,
            plots_enabled=self.cfg.logging.plots,
            resume_step=self.step if resume_path is not None else None,
            enabled=self.is_main,
        )

    def _rank_log(self, run_dir: Path, to_console: Callable[[str], None]) -> Callable[[str], None]:
        """Every rank logs to RUN_DIR/logs/rank<r>.log; the main rank also to the console."""
        assert self.runtime is not None
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        self._log_file = (run_dir / "logs" / f"rank{self.runtime.rank}.log").open("a", encoding="utf-8")
        self._log_file.write(
            f"{time.strftime('%Y-%m-%d %H:%M:%S')} rank {self.runtime.rank}: {self.runtime.dims.describe()}\n"
        )
        self._log_file.flush()

        def log(msg: str) -> None:
            self._log_file.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
            self._log_file.flush()
            if self.is_main:
                to_console(msg)

        return log

    def close(self) -> None:
        """Finish an asynchronous save still in flight (a run that raised: its checkpoint was
        taken before), then release the process group and the per-rank log."""
        try:
            self.wait_for_checkpoint()
        except Exception as err:  # noqa: BLE001 - closing goes on; the run already failed or reported
            self.log(f"the asynchronous checkpoint failed: {err}")
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self.runtime is not None:
            self.runtime.close()

    # ---- resume -------------------------------------------------------------------------
    def _find_resume(self, resume: str | None) -> Path | None:
        if resume is None:
            if ckpt.list_checkpoints(self.checkpoints_dir):
                raise ConfigError(
                    "--run-dir",
                    f"{self.run_dir} already holds checkpoints; "
                    "pass --resume auto to continue it or pick another --run-dir",
                )
            return None
        # Sizes of every file and the small side files here; the shards' contents are hashed by
        # the load's own reads (ckpt.load_verified), which falls back to older ones if need be.
        self._resume_auto = resume == "auto"
        agree = self._all_ranks_agree if self.runtime is not None else None
        if resume == "auto":
            return ckpt.latest_valid_checkpoint(self.checkpoints_dir, self.log, checksums=ckpt.SIDE_FILES, agree=agree)
        path = Path(resume)
        error = None
        try:
            ckpt.verify_checkpoint(path, ckpt.SIDE_FILES)
        except CheckpointError as err:
            error = err
        if agree is not None and not agree(error is None) and error is None:
            error = CheckpointError(f"{path}: does not verify on another rank (see its log)")
        if error is not None:
            raise error
        return path

    def _all_ranks_agree(self, ok: bool) -> bool:
        """Whether `ok` holds on every rank (a collective, on the training device)."""
        flag = torch.tensor([int(ok)], device=self.runtime.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    def _load(self, path: Path) -> None:
        """Resume from `path`; with --resume auto, from the next older checkpoint if its contents
        turn out corrupted while loading (ckpt.load_verified)."""
        while True:
            try:
                self._load_weights(path)
                break
            except ckpt.CorruptCheckpoint as err:
                if not self._resume_auto:
                    raise
                self.log(f"skipping checkpoint: {err}")
                path = ckpt.latest_valid_checkpoint(
                    self.checkpoints_dir,
                    self.log,
                    checksums=ckpt.SIDE_FILES,
                    agree=self._all_ranks_agree if self.runtime is not None else None,
                    older_than=path,
                )
                if path is None:
                    raise CheckpointError(f"{self.checkpoints_dir}: no checkpoint verifies") from None
        self._load_state(path)

    def _load_weights(self, path: Path) -> None:
        import yaml

        # through compose_config: keys renamed since the checkpoint was written compare under their new names
        saved = compose_config(yaml.safe_load(ckpt.read_checkpoint_config(path))).to_dict()
        current = self.cfg.to_dict()
        for section in RESUME_MUST_MATCH:
            if section == "fff" and self.cfg.model.ffn != "fff":
                continue  # the tree's settings only shape FFF models
            diff = first_difference(saved[section], current[section], section + ".")
            if diff:
                raise ConfigError("--resume", f"{path} was trained with a different config: {diff}")
        distributed = self.runtime is not None
        ckpt.load_verified(
            path,
            self.engine.module,
            self.optimizer,
            distributed=distributed,
            partial=distributed and self.runtime.dims.pp > 1,
            rank=self.rank,
            world_size=self.runtime.dims.world_size if distributed else 1,
            agree=self._all_ranks_agree if distributed else None,
        )

    def _load_state(self, path: Path) -> None:
        state = ckpt.read_trainer_state(path)
        load_scheduler_state(self.scheduler, state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        self.nonfinite_total = int(state["nonfinite_total"])
        self.skips = SkippedSteps(self.device, self.nonfinite_total)
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(_as_python_rng_state(state["rng"]["python"]))
        np.random.set_state(_as_numpy_rng_state(state["rng"]["numpy"]))
        self.log(f"resumed from {path} at step {self.step}")

    def _state(self) -> dict[str, Any]:
        self.check_skipped_steps()  # the count on the host (and no save after too many skips)
        np_state = np.random.get_state()
        return {
            "step": self.step,
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "nonfinite_total": self.nonfinite_total,
            "rng": {
                "torch": torch.get_rng_state(),
                "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
                "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            },
        }

    def save(self) -> Path | None:
        """Write a checkpoint: every rank its own shards, the main rank the rest (collective).
        With checkpoint.async_save, the shards are written in the background and this returns
        the path the checkpoint is published under once complete (wait_for_checkpoint)."""
        self.wait_for_checkpoint()  # one save at a time: the previous one is published first
        layout = {"world_size": 1}
        if self.runtime is not None:
            d = self.runtime.dims
            layout = {
                "world_size": d.world_size,
                "dp_replicate": d.dp_replicate,
                "dp_shard": d.dp_shard,
                "ep": d.ep,
                "tp": d.tp,
                "pp": d.pp,
            }
        distributed = self.runtime is not None
        args = (
            self.checkpoints_dir,
            self.step,
            sharded.model_state(self.model),
            sharded.optimizer_state(self.model, self.optimizer),
            self._state(),
            self.cfg.to_yaml(),
        )
        kwargs = {
            "keep": self.cfg.checkpoint.keep,
            "layout": layout,
            "distributed": distributed,
            "is_main": self.is_main,
        }
        if self.cfg.checkpoint.async_save:
            if self._checkpoint_groups is None:
                self._checkpoint_groups = ckpt.checkpoint_groups(distributed)
            self._pending_save = ckpt.start_checkpoint(*args, groups=self._checkpoint_groups, **kwargs)
            return self._pending_save.path if self.is_main else None
        path = ckpt.save_checkpoint(*args, **kwargs)  # SPARSE_TRAIN_FAIL_AT=STEP:RANK:save fires inside
        if distributed:
            torch.distributed.barrier()  # no rank runs ahead of a checkpoint that is not yet published
        return path

    def wait_for_checkpoint(self) -> Path | None:
        """Block until the asynchronous save in flight, if any, is published; its path (main rank)."""
        pending, self._pending_save = self._pending_save, None
        return pending.wait() if pending is not None else None

    def _maybe_fail(self, where: str) -> None:
        faults.maybe_fail(self.failure_plan, step=self.step, rank=self.rank, where=where, run_dir=self.run_dir)

    # ---- one step -----------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.train.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, report: bool = True) -> dict[str, Any]:
        """One optimizer step over grad_accum micro-batches. With `report`, returns its metrics
        (collectives and host reads); without, only {"step": n}, and the step neither waits for
        the device nor adds a collective for metrics. Running out of memory ends it with one
        line (OutOfMemory) naming the layout and the measured peak."""
        try:
            return self._train_step(report)
        except RuntimeError as err:  # torch.OutOfMemoryError is one
            if not memory.is_out_of_memory(err):
                raise
            raise OutOfMemory(self._out_of_memory_message()) from None

    def _train_step(self, report: bool) -> dict[str, Any]:
        self.engine.module.train()
        batches = [self.sampler.next_batch() for _ in range(self.cfg.train.grad_accum)]
        self.engine.set_step(self.step)
        local = self.engine.forward_backward(batches, self.autocast)
        # A non-finite loss on any rank makes the global norm infinite on all of them.
        grad_norm = self.engine.clip_grad_norm(self.cfg.optimizer.grad_clip, poison=~local.finite)
        skipped = ~torch.isfinite(grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.found_inf = skipped.float()  # fused AdamW leaves everything as it was when set
        self.optimizer.step()
        self.engine.update_expert_bias(skipped)  # aux-loss-free balancing, when a router has a bias
        self.skips.record(skipped)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        if not report:
            return {"step": self.step}
        result = self.engine.reduce(local)
        counts = self.check_skipped_steps()
        if counts.streak:
            return {"step": self.step, "skipped": True, "lr": lr, "nonfinite_steps": counts.total}
        record = {
            "step": self.step,
            **result.losses,
            "lr": lr,
            "grad_norm": grad_norm.item(),
            "nonfinite_steps": counts.total,
        }
        for name, stats in zip(result.layer_names, result.layer_stats, strict=True):
            kind, load = stats["kind"], stats["load"].tolist()  # a CPU tensor already: no device read
            record[f"{kind}/{name}/{LOAD_NAMES[kind]}"] = [round(v, 5) for v in load]
            record[f"{kind}/{name}/load_imbalance"] = max(load) * len(load)
            for key, value in stats["metrics"].items():
                record[f"{kind}/{name}/{key}"] = value
        return record

    def check_skipped_steps(self) -> SkipCounts:
        """Read the skipped-step counts (one host read), log skips since the last read, and stop
        the run when train.max_nonfinite_steps were skipped in a row."""
        counts = self.skips.read()
        self.nonfinite_total = counts.total
        if counts.since_last_read:
            self.log(
                f"step {self.step}: non-finite loss or gradient, {counts.since_last_read} step(s) skipped since "
                f"the last report ({counts.streak} in a row now, {counts.total} in the run)"
            )
        limit = self.cfg.train.max_nonfinite_steps
        if counts.longest_streak >= limit:
            raise TrainingStopped(
                f"stopped at step {self.step}: {counts.longest_streak} non-finite steps in a row "
                f"(train.max_nonfinite_steps={limit}); weights were not updated by any of them and the last "
                "checkpoint is intact. Lower optimizer.lr or check the data."
            )
        return counts

    # ---- memory ---------------------------------------------------------------------------
    def layout(self) -> str:
        return self.runtime.dims.describe() if self.runtime is not None else "one process"

    def predict_memory(self) -> memory.MemoryPrediction:
        """This rank's predicted step peak (train/memory.py); the process's own cost measured now."""
        return memory.predict(
            self.engine.module,
            self.cfg,
            self.runtime.dims if self.runtime is not None else None,
            pp_rank=self.runtime.pp_rank if self.runtime is not None else 0,
            baseline_mb=memory.process_baseline_mb(self.device, self.engine.module, self.optimizer),
        )

    def check_memory(self) -> memory.MemoryPrediction:
        """Before the first step: warn (one line) when the predicted peak exceeds what this rank can have."""
        self.memory_prediction = self.predict_memory()
        message = memory.shortfall(self.memory_prediction, memory.capacity_mb(self.device), self.layout())
        if message:
            self.log(f"warning: rank {self.rank}: {message}")
        return self.memory_prediction

    def _out_of_memory_message(self) -> str:
        predicted = self.memory_prediction.step_mb if self.memory_prediction else self.predict_memory().step_mb
        return (
            f"out of memory in step {self.step + 1} on rank {self.rank} ({self.layout()}): peak "
            f"{memory.peak_mb(self.device):,.0f} MB measured, {predicted:,.0f} MB predicted per rank; lower "
            "train.batch_size or data.seq_len, or shard over more ranks (sparse-train bench memory shows the split)"
        )

    def evaluate(self) -> tuple[float, np.ndarray]:
        """Mean validation LM loss over the fixed validation batches, and expert load [layers, E].
        With a mixture, over the pooled sources (evaluate_sources)."""
        if self.source_val_batches:
            result = self.evaluate_sources()
            return result.val_loss, result.load_LE
        return self._evaluate_batches(self.val_batches)

    def _evaluate_batches(self, batches: list) -> tuple[float, np.ndarray]:
        val_loss, loads = self.engine.evaluate(batches, self.autocast)
        load_LE = np.stack([v.numpy() for v in loads]) if loads else np.zeros((0, 0))
        return val_loss, load_LE

    def evaluate_sources(self) -> SourceEvaluation:
        """Each mixture source's validation loss and expert load (collective: one engine
        evaluation per source, the same sequence on every rank)."""
        losses, loads = {}, {}
        for name, batches in self.source_val_batches.items():
            losses[name], loads[name] = self._evaluate_batches(batches)
        return SourceEvaluation(losses, loads)

    # ---- the loop -----------------------------------------------------------------------
    def fit(self, stop_at: int | None = None) -> RunSummary:
        """Train to train.steps, or stop early after step `stop_at` (the schedule stays that of the
        whole run: a run stopped there and resumed trains exactly as one that never stopped)."""
        t = self.cfg.train
        last = t.steps if stop_at is None else min(stop_at, t.steps)
        tokens_per_step = t.batch_size * t.grad_accum * self.cfg.data.seq_len
        start_step = self.step
        first_loss = last_loss = val_loss = None
        last_ckpt: Path | None = None
        window_tokens, window_time, total_tokens, total_time = 0, 0.0, 0, 0.0
        last_record: dict[str, Any] = {}
        bar = tqdm(
            total=t.steps,
            initial=self.step,
            disable=not (self.cfg.logging.progress and self.is_main),
            desc="train",
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
        )
        try:
            if self.step < last:
                self.check_memory()  # the predicted peak against what this rank can have
            if self.initialised_from_weights and self.step == 0:
                self._evaluate_and_log()  # where the given weights start: step 0 of the loss curve
            while self.step < last:
                upcoming = self.step + 1
                logged = upcoming % t.log_every == 0 or upcoming == t.steps
                # Only reported steps read metrics back (the run's first for the summary, its last).
                report = logged or upcoming == start_step + 1 or upcoming == last
                started = time.perf_counter()
                record = self.train_step(report=report)
                elapsed = time.perf_counter() - started
                window_tokens += tokens_per_step
                window_time += elapsed
                total_tokens += tokens_per_step
                total_time += elapsed
                bar.update(1)
                if "loss" in record:
                    last_loss = record["loss"]
                    first_loss = first_loss if first_loss is not None else record["loss"]
                    bar.set_postfix(
                        loss=f"{record['loss']:.3f}", tok_s=f"{window_tokens / max(window_time, 1e-9):,.0f}"
                    )
                if logged:
                    self.collapse.check(self.step, record)
                    record["tokens_per_s"] = window_tokens / max(window_time, 1e-9)
                    window_tokens, window_time = 0, 0.0
                    self.metrics.log(record)
                    if "loss" in record:
                        last_record = record
                if not self.peak_memory_mb:  # once per process, after its first step (and its record)
                    self._record_peak_memory()
                if (t.eval_every and self.step % t.eval_every == 0) or self.step == t.steps:
                    val_loss = self._evaluate_and_log()
                every = self.cfg.checkpoint.every
                if (every and self.step % every == 0) or (self.step == t.steps and self.cfg.checkpoint.save_final):
                    last_ckpt = self.save()
                self._maybe_fail("step")
            self.wait_for_checkpoint()  # the end of training: the last checkpoint is published
        finally:
            bar.close()
            self.metrics.close()
        if start_step >= t.steps:
            self.log(f"nothing to do: the run is already at step {self.step} of train.steps={t.steps}")
        return RunSummary(
            run_dir=self.run_dir,
            steps=self.step,
            first_loss=first_loss,
            last_loss=last_loss,
            val_loss=val_loss,
            tokens_per_s=total_tokens / max(total_time, 1e-9),
            load_imbalance={k.split("/")[1]: v for k, v in last_record.items() if k.endswith("/load_imbalance")},
            nonfinite_steps=self.nonfinite_total,
            checkpoint=last_ckpt,
            params=self.params,
            sparse_kind=self.cfg.model.ffn,
            peak_memory_mb=self.peak_memory_mb,
        )

    def _record_peak_memory(self) -> None:
        """Every rank's peak memory after building and after its first step, in metrics.jsonl
        (`memory/*_peak_mb`, one value per rank) and, as the largest over ranks, in the summary."""
        table = memory.per_rank(
            [self.build_peak_mb, memory.peak_mb(self.device)], self.device, self.runtime is not None
        )
        build, step = [row[0] for row in table], [row[1] for row in table]
        self.metrics.log({"step": self.step, "memory/build_peak_mb": build, "memory/step_peak_mb": step})
        self.peak_memory_mb = {"build": max(build), "step": max(step), "ranks": len(table)}

    def _evaluate_and_log(self) -> float:
        if self.source_val_batches:
            result = self.evaluate_sources()
            val_loss, load_LE = result.val_loss, result.load_LE
            names = self.engine.layer_names() if load_LE.size else []
            self.metrics.log({"step": self.step, **source_records(result, names, self.cfg.model.ffn)})
        else:
            val_loss, load_LE = self.evaluate()
            self.metrics.log({"step": self.step, "val_loss": val_loss})
        if load_LE.size:
            self.metrics.log_load(self.step, load_LE, self.engine.layer_names(), self.cfg.model.ffn)
        return val_loss


def _as_python_rng_state(saved: list) -> tuple:
    return (saved[0], tuple(saved[1]), saved[2])


def _as_numpy_rng_state(saved: list) -> tuple:
    return (saved[0], saved[1].numpy().astype(np.uint32), *saved[2:])
