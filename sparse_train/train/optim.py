"""AdamW with decay only on matrices, and a linear-warmup + cosine (or constant) schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from sparse_train.config import OptimizerConfig

# FFF node neurons (models.fff.TreeRouter) may train at their own learning rate.
NODE_PARAMETERS = ("tree.node_weight_ND", "tree.node_bias_N")


def build_optimizer(
    model: nn.Module, cfg: OptimizerConfig, *, foreach: bool | None = None, node_lr_scale: float = 1.0
) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters: matrices decayed, vectors (norm scales,
    biases) not; FFF node neurons in their own groups at `node_lr_scale * lr`. `foreach=False`
    for sharded models, whose DTensor parameters live on different meshes (experts vs the rest)
    that one foreach kernel cannot mix."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = (name.endswith(NODE_PARAMETERS), p.dim() >= 2)
            groups.setdefault(key, []).append(p)
    param_groups = []
    for is_node in (False, True):
        for decayed in (True, False):
            if (is_node, decayed) in groups or not is_node:  # the two plain groups always exist
                param_groups.append(
                    {
                        "params": groups.get((is_node, decayed), []),
                        "weight_decay": cfg.weight_decay if decayed else 0.0,
                        "lr": cfg.lr * (node_lr_scale if is_node else 1.0),
                    }
                )
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=foreach)


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
