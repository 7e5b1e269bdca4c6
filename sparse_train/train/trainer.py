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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from sparse_train.config import Config, ConfigError, config_from_dict
from sparse_train.data.dataset import BatchSampler, TokenData, load_token_data, validation_batches
from sparse_train.data.tokenizer import build_tokenizer
from sparse_train.models.transformer import Transformer, count_parameters
from sparse_train.train import checkpoint as ckpt
from sparse_train.train.loss import LossParts, total_loss
from sparse_train.train.metrics import MetricsLogger
from sparse_train.train.optim import build_optimizer, build_scheduler

# Sections a resumed run must share with its checkpoint (the rest may change between runs).
RESUME_MUST_MATCH = ("model", "moe", "router", "data")


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row); one-line message."""


@dataclass
class RunSummary:
    run_dir: Path
    steps: int
    first_loss: float | None
    last_loss: float | None
    val_loss: float | None
    tokens_per_s: float
    load_imbalance: dict[str, float]  # per MoE layer: max expert load / mean load (1.0 = even)
    nonfinite_steps: int
    checkpoint: Path | None
    params: dict[str, int] = field(default_factory=dict)


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
    return config_from_dict(data)


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


def layer_names(model: Transformer) -> list[str]:
    return [f"block{i}" for i, b in enumerate(model.blocks) if b.ffn in model.moe_layers]


class Trainer:
    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        *,
        resume: str | None = None,
        log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
        data: TokenData | None = None,
    ) -> None:
        self.log = log
        self.run_dir = run_dir
        self.checkpoints_dir = run_dir / "checkpoints"
        self.device = select_device(cfg.train.device)
        self.tokenizer = build_tokenizer(cfg.data.tokenizer)
        self.cfg = resolve_config(cfg, self.tokenizer.vocab_size)
        resume_path = self._find_resume(resume)

        torch.manual_seed(self.cfg.train.seed)
        random.seed(self.cfg.train.seed)
        self.data = data or load_token_data(self.cfg.data, self.tokenizer, self.cfg.model.vocab_size)
        self.model = Transformer(self.cfg).to(self.device)
        self.optimizer = build_optimizer(self.model, self.cfg.optimizer)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.optimizer, self.cfg.train.steps)
        t = self.cfg.train
        self.sampler = BatchSampler(self.data.train, self.cfg.data.seq_len, t.batch_size, t.seed)
        self.val_batches = validation_batches(self.data.val, self.cfg.data.seq_len, t.batch_size, t.eval_batches)
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_streak = 0
        if resume_path is not None:
            self._load(resume_path)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(self.cfg.to_yaml())
        self.metrics = MetricsLogger(
            run_dir,
            tensorboard=self.cfg.logging.tensorboard,
            plots_enabled=self.cfg.logging.plots,
            resume_step=self.step if resume_path is not None else None,
        )

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
        if resume == "auto":
            return ckpt.latest_valid_checkpoint(self.checkpoints_dir, self.log)
        path = Path(resume)
        ckpt.verify_checkpoint(path)
        return path

    def _load(self, path: Path) -> None:
        import yaml

        saved = yaml.safe_load(ckpt.read_checkpoint_config(path))
        current = self.cfg.to_dict()
        for section in RESUME_MUST_MATCH:
            diff = first_difference(saved[section], current[section], section + ".")
            if diff:
                raise ConfigError("--resume", f"{path} was trained with a different config: {diff}")
        state = ckpt.load_checkpoint(path, self.model, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        self.nonfinite_total = int(state["nonfinite_total"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(_as_python_rng_state(state["rng"]["python"]))
        np.random.set_state(_as_numpy_rng_state(state["rng"]["numpy"]))
        self.log(f"resumed from {path} at step {self.step}")

    def _state(self) -> dict[str, Any]:
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

    def save(self) -> Path:
        path = ckpt.save_checkpoint(
            self.checkpoints_dir,
            self.step,
            self.model,
            self.optimizer,
            self._state(),
            self.cfg.to_yaml(),
            keep=self.cfg.checkpoint.keep,
        )
        return path

    # ---- one step -----------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.train.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def compute_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[LossParts, list]:
        with self.autocast():
            output = self.model(inputs)
        return total_loss(output, targets, self.cfg.router), output.moe_aux

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over grad_accum micro-batches; returns its metrics."""
        self.model.train()
        accum = self.cfg.train.grad_accum
        sums: dict[str, float] = {"loss": 0.0, "lm_loss": 0.0, "aux_loss": 0.0, "z_loss": 0.0}
        layer_stats: list[dict[str, Any]] = []
        finite = True
        for _ in range(accum):
            inputs, targets = (t.to(self.device) for t in self.sampler.next_batch())
            parts, moe_aux = self.compute_loss(inputs, targets)
            if not torch.isfinite(parts.loss):
                finite = False
                continue  # the batch is consumed either way, so the data order stays deterministic
            (parts.loss / accum).backward()
            for key in sums:
                sums[key] += float(getattr(parts, key).detach()) / accum
            _accumulate_layer_stats(layer_stats, moe_aux, accum)
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.cfg.optimizer.grad_clip
        grad_norm = (
            float(torch.nn.utils.clip_grad_norm_(params, clip if clip is not None else float("inf"))) if params else 0.0
        )
        finite = finite and np.isfinite(grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        if finite:
            self.optimizer.step()
            self.nonfinite_streak = 0
        else:
            self.nonfinite_total += 1
            self.nonfinite_streak += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        if not finite:
            self.log(f"step {self.step}: non-finite loss or gradient, step skipped ({self.nonfinite_streak} in a row)")
            if self.nonfinite_streak >= self.cfg.train.max_nonfinite_steps:
                raise TrainingStopped(
                    f"stopped at step {self.step}: {self.nonfinite_streak} non-finite steps in a row "
                    f"(train.max_nonfinite_steps={self.cfg.train.max_nonfinite_steps}); weights were not updated "
                    "by any of them and the last checkpoint is intact. Lower optimizer.lr or check the data."
                )
            return {"step": self.step, "skipped": True, "lr": lr, "nonfinite_steps": self.nonfinite_total}
        record = {"step": self.step, **sums, "lr": lr, "grad_norm": grad_norm, "nonfinite_steps": self.nonfinite_total}
        for name, stats in zip(layer_names(self.model), layer_stats, strict=True):
            load = stats["expert_load"]
            record[f"moe/{name}/expert_load"] = [round(float(v), 5) for v in load]
            record[f"moe/{name}/load_imbalance"] = float(load.max() * load.numel())
            record[f"moe/{name}/dropped_fraction"] = stats["dropped_fraction"]
            record[f"moe/{name}/router_entropy"] = stats["router_entropy"]
        return record

    @torch.no_grad()
    def evaluate(self) -> tuple[float, np.ndarray]:
        """Mean validation LM loss over the fixed validation batches, and expert load [layers, E]."""
        self.model.eval()
        total, loads = 0.0, []
        for inputs, targets in self.val_batches:
            parts, moe_aux = self.compute_loss(inputs.to(self.device), targets.to(self.device))
            total += float(parts.lm_loss)
            loads.append([a.expert_load_E.cpu().numpy() for a in moe_aux])
        load_LE = np.mean(np.array(loads), axis=0) if loads and loads[0] else np.zeros((0, 0))
        return total / len(self.val_batches), load_LE

    # ---- the loop -----------------------------------------------------------------------
    def fit(self) -> RunSummary:
        t = self.cfg.train
        tokens_per_step = t.batch_size * t.grad_accum * self.cfg.data.seq_len
        start_step = self.step
        first_loss = last_loss = val_loss = None
        last_ckpt: Path | None = None
        window_tokens, window_time, total_tokens, total_time = 0, 0.0, 0, 0.0
        last_record: dict[str, Any] = {}
        bar = tqdm(
            total=t.steps,
            initial=self.step,
            disable=not self.cfg.logging.progress,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
        )
        try:
            while self.step < t.steps:
                started = time.perf_counter()
                record = self.train_step()
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
                if self.step % t.log_every == 0 or self.step == t.steps or record.get("skipped"):
                    record["tokens_per_s"] = window_tokens / max(window_time, 1e-9)
                    window_tokens, window_time = 0, 0.0
                    self.metrics.log(record)
                    if "loss" in record:
                        last_record = record
                if (t.eval_every and self.step % t.eval_every == 0) or self.step == t.steps:
                    val_loss = self._evaluate_and_log()
                every = self.cfg.checkpoint.every
                if (every and self.step % every == 0) or (self.step == t.steps and self.cfg.checkpoint.save_final):
                    last_ckpt = self.save()
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
            params=count_parameters(self.model),
        )

    def _evaluate_and_log(self) -> float:
        val_loss, load_LE = self.evaluate()
        self.metrics.log({"step": self.step, "val_loss": val_loss})
        if load_LE.size:
            self.metrics.log_expert_load(self.step, load_LE, layer_names(self.model))
        return val_loss


def _accumulate_layer_stats(acc: list[dict[str, Any]], moe_aux: list, accum: int) -> None:
    for i, aux in enumerate(moe_aux):
        if len(acc) <= i:
            acc.append(
                {"expert_load": torch.zeros(aux.expert_load_E.shape), "dropped_fraction": 0.0, "router_entropy": 0.0}
            )
        acc[i]["expert_load"] += aux.expert_load_E.detach().cpu() / accum
        acc[i]["dropped_fraction"] += float(aux.dropped_fraction) / accum
        acc[i]["router_entropy"] += float(aux.router_entropy) / accum


def _as_python_rng_state(saved: list) -> tuple:
    return (saved[0], tuple(saved[1]), saved[2])


def _as_numpy_rng_state(saved: list) -> tuple:
    return (saved[0], saved[1].numpy().astype(np.uint32), *saved[2:])
