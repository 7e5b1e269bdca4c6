"""AdamW with decay only on matrices, and a linear-warmup + cosine (or constant) schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from sparse_train.config import OptimizerConfig


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, *, foreach: bool | None = None) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters. `foreach=False` for sharded models, whose
    DTensor parameters live on different meshes (experts vs the rest) that one foreach kernel
    cannot mix."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)  # norms' scales are never decayed
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=foreach)


def lr_factor(completed_steps: int, cfg: OptimizerConfig, total_steps: int) -> float:
    """Multiplier of cfg.lr for the step that follows `completed_steps` finished ones."""
    if completed_steps < cfg.warmup_steps:
        return (completed_steps + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (completed_steps - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))
