"""AdamW with decay only on matrices, and a linear-warmup + cosine (or constant) schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from sparse_train.config import OptimizerConfig


def build_optimizer(
    model: nn.Module, cfg: OptimizerConfig, *, foreach: bool | None = None, node_lr_scale: float = 1.0
) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters: matrices decayed, vectors (norm scales,
    biases) not; FFF node neurons (FFFLayer.node_parameters) in their own groups at
    `node_lr_scale * lr`. `foreach=False` for sharded models, whose DTensor parameters live on
    different meshes (experts vs the rest) that one foreach kernel cannot mix."""
    from sparse_train.models.fff import FFFLayer

    node_ids = {id(p) for m in model.modules() if isinstance(m, FFFLayer) for p in m.node_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    plain = [p for p in trainable if id(p) not in node_ids]
    nodes = [p for p in trainable if id(p) in node_ids]
    groups = _decay_groups(plain, cfg.weight_decay, cfg.lr)
    if nodes:
        groups += _decay_groups(nodes, cfg.weight_decay, cfg.lr * node_lr_scale)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=foreach)


def _decay_groups(params: list[nn.Parameter], weight_decay: float, lr: float) -> list[dict]:
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay, "lr": lr},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr": lr},  # norms, biases
    ]


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
