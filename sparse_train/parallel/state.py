"""Whole-model views of a sharded model: the global gradient norm, and full (unsharded) weights.

Parameters may be plain tensors or DTensors sharded over any mix of dp_shard (FSDP2), ep,
tp; a pipeline stage holds only its blocks. DTensor reductions make each parameter's norm and
full value exact regardless of its placements; the pipeline stages are then combined over the
"pp" group. Names are those of the single-device model everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def global_grad_norm(params: Iterable[nn.Parameter], pp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """L2 norm over every gradient of the whole model, however it is sharded (fp32 scalar)."""
    total = torch.zeros((), dtype=torch.float32)
    for p in params:
        if p.grad is not None:
            norm = _full(torch.linalg.vector_norm(p.grad, 2, dtype=torch.float32))
            total = total + norm.cpu().square()
    if pp_group is not None:
        dist.all_reduce(total, group=pp_group)  # stages hold disjoint parameters
    return total.sqrt()


def clip_grad_norm_(
    params: list[nn.Parameter], max_norm: float | None, pp_group: dist.ProcessGroup | None = None
) -> float:
    """Clip gradients to a global norm of `max_norm` (None: measure only); returns the norm before."""
    norm = float(global_grad_norm(params, pp_group))
    if max_norm is not None and math.isfinite(norm):
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef)
    return norm


def full_state_dict(module: nn.Module, pp_group: dist.ProcessGroup | None = None) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer, unsharded, on CPU, on every rank (collective)."""
    return _gather_stages({name: _full(t.detach()).cpu() for name, t in module.state_dict().items()}, pp_group)


def full_gradients(module: nn.Module, pp_group: dist.ProcessGroup | None = None) -> dict[str, torch.Tensor]:
    """Every parameter's gradient, unsharded, on CPU, on every rank (collective)."""
    local = {name: _full(p.grad).cpu() for name, p in module.named_parameters() if p.grad is not None}
    return _gather_stages(local, pp_group)


def _gather_stages(local: dict[str, torch.Tensor], pp_group: dist.ProcessGroup | None) -> dict[str, torch.Tensor]:
    if pp_group is None or dist.get_world_size(pp_group) == 1:
        return local
    parts: list[dict[str, torch.Tensor] | None] = [None] * dist.get_world_size(pp_group)
    dist.all_gather_object(parts, local, group=pp_group)
    merged: dict[str, torch.Tensor] = {}
    for part in parts:
        merged.update(part or {})
    return merged


@torch.no_grad()
def load_full_state_dict(module: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Copy full (unsharded) tensors into a possibly sharded module; names it does not hold are skipped."""
    for name, target in module.state_dict(keep_vars=True).items():
        value = full[name].to(device=target.device, dtype=target.dtype)
        if isinstance(target, DTensor):
            value = distribute_tensor(value, target.device_mesh, target.placements)
        target.copy_(value)
