"""AdamW with decay on weight matrices only, and a linear-warmup + cosine (or constant) schedule.

Weight decay (docs/decisions.md, "What weight decay applies to"): Megatron-Core's default rule.
Decayed: every weight matrix, i.e. attention and FFN projections, stacked expert and leaf
weights, the token embedding, the lm_head (one tensor with the embedding when tied), the MoE
router and shared-expert gate, and the FFF node neurons (the tree is the FFF's router, so it
is treated as the MoE router is). Not decayed: normalisation layers' parameters and every
vector (biases, FFF node biases, the master-leaf blend logit), and stacked expert biases.
Megatron-Core skips decay on
1-D parameters and on `*.bias`; nanoGPT on every parameter of fewer than two dimensions;
neither spares embeddings, the output layer or the router.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from sparse_train.config import OptimizerConfig

# Normalisation layers: their scales (and shifts) keep the activations' scale; decaying them
# pulls that scale towards 0, which no reference implementation does.
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.RMSNorm, nn.LayerNorm, nn.GroupNorm)


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, *, node_lr_scale: float = 1.0) -> torch.optim.AdamW:
    """Fused AdamW over the model's trainable parameters: weight matrices decayed, norms and
    vectors (biases, blend logits) not (module docstring); FFF node neurons
    (FFFLayer.node_parameters) in their own groups at `node_lr_scale * lr`.

    Fused, because its kernel takes `optimizer.found_inf` (a device flag) and then leaves
    weights, moments and step counts exactly as they were: the trainer skips a non-finite step
    without reading the flag on the host (docs/decisions.md, "A step with no host reads").
    One fused kernel cannot mix DTensors of different meshes (experts vs the rest) or DTensors
    with plain tensors, so each group is split by mesh.

    Groups, in this order, each split by mesh in order of first appearance: decayed, not
    decayed, and when the model has FFF layers, decayed nodes, not decayed nodes. Checkpoints
    store hyperparameters per parameter name (flattened), so the split does not bind them."""
    from sparse_train.models.fff import FFFLayer

    node_ids = {id(p) for m in model.modules() if isinstance(m, FFFLayer) for p in m.node_parameters()}
    exempt_ids = no_decay_parameter_ids(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    plain = [p for p in trainable if id(p) not in node_ids]
    nodes = [p for p in trainable if id(p) in node_ids]
    groups = _decay_groups(plain, exempt_ids, cfg.weight_decay, cfg.lr)
    if nodes:
        groups += _decay_groups(nodes, exempt_ids, cfg.weight_decay, cfg.lr * node_lr_scale)
    groups = [part for group in groups for part in _split_by_mesh(group)]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)


def _split_by_mesh(group: dict) -> list[dict]:
    """`group` as one group per device mesh of its parameters (plain tensors: one more), in
    order of first appearance; an empty group stays one empty group."""
    by_mesh: dict[int | None, list[nn.Parameter]] = {}
    for p in group["params"]:
        by_mesh.setdefault(id(p.device_mesh) if isinstance(p, DTensor) else None, []).append(p)
    if not by_mesh:
        return [group]
    return [dict(group, params=params) for params in by_mesh.values()]


def no_decay_parameter_ids(model: nn.Module) -> set[int]:
    """ids of the parameters weight decay skips: those of normalisation layers, the stacked
    expert biases (a module's `bias_parameters()`), and every parameter of fewer than two
    dimensions (biases, node biases, blend logits). Chosen by
    module type and shape, not by name, so renaming a parameter cannot change its decay."""
    exempt = {id(p) for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters()}
    # stacked per-expert biases ([E, ...]: gpt-oss's) are biases, whatever their rank
    exempt |= {id(p) for m in model.modules() if hasattr(m, "bias_parameters") for p in m.bias_parameters()}
    return exempt | {id(p) for p in model.parameters() if p.dim() < 2}


def _decay_groups(params: list[nn.Parameter], exempt_ids: set[int], weight_decay: float, lr: float) -> list[dict]:
    return [
        {"params": [p for p in params if id(p) not in exempt_ids], "weight_decay": weight_decay, "lr": lr},
        {"params": [p for p in params if id(p) in exempt_ids], "weight_decay": 0.0, "lr": lr},
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


def load_scheduler_state(scheduler: torch.optim.lr_scheduler.LambdaLR, saved: dict) -> None:
    """Resume `scheduler` at the saved step. The schedule is a function of the step, and the
    number of parameter groups depends on the layout (groups are split by mesh), so only the
    step counters are taken from `saved`; each group's lr is set from this run's own groups."""
    counters = {k: v for k, v in saved.items() if k in ("last_epoch", "_step_count")}
    scheduler.load_state_dict({**counters, "lr_lambdas": [None] * len(scheduler.lr_lambdas)})  # plain functions
    for group, base_lr, factor in zip(
        scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
    ):
        group["lr"] = base_lr * factor(scheduler.last_epoch)
