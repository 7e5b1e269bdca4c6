"""Whole-model views of a sharded model: the global gradient norm, and full (unsharded) weights.

Parameters may be plain tensors or DTensors sharded over any mix of dp_shard (FSDP2), ep,
tp; a pipeline stage holds only its blocks. The gradient norm adds up each rank's local pieces
in one all-reduce (see global_grad_norm); full values come from DTensor's own gathers, and the
pipeline stages' parts are combined over the "pp" group. Names are those of the single-device
model everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.utils import get_total_norm


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _copies(grad: torch.Tensor, holders: int) -> int:
    """How many ranks hold an identical copy of this rank's piece of `grad`, among the `holders`
    ranks that hold the parameter at all (a pipeline stage's ranks)."""
    if not isinstance(grad, DTensor):
        return holders  # replicated: data-parallel replicas keep identical gradients
    mesh = grad.device_mesh
    replicated = math.prod(mesh.size(d) for d, placement in enumerate(grad.placements) if placement.is_replicate())
    return replicated * holders // mesh.size()  # copies within its mesh, times the meshes beside it


def global_grad_norm(
    params: Iterable[nn.Parameter], pipeline_stages: int = 1, poison: torch.Tensor | None = None
) -> torch.Tensor:
    """L2 norm over every gradient of the whole model, however it is sharded (fp32 scalar on the
    gradients' device), in one all-reduce over all ranks whatever the number of parameters.

    Each rank sums the squares of the pieces it holds, each weighted by 1 / (ranks holding the
    same piece): summed over all ranks, every distinct piece then counts exactly once (pipeline
    stages hold disjoint parameters, shards disjoint pieces, replicas the same one).

    `poison` (a bool scalar on the device, this rank's own) makes the norm infinite on every
    rank when it is true on any: a non-finite loss seen by one rank reaches all of them through
    the all-reduce the norm needs anyway, without a host read."""
    distributed = dist.is_available() and dist.is_initialized()
    holders = dist.get_world_size() // pipeline_stages if distributed else 1
    by_copies: dict[int, list[torch.Tensor]] = {}
    partial: list[torch.Tensor] = []
    for p in params:
        if p.grad is None:
            continue
        if isinstance(p.grad, DTensor) and any(pl.is_partial() for pl in p.grad.placements):
            partial.append(p.grad)  # a pending sum: its pieces' squares do not add up (not seen in our layouts)
            continue
        local = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        by_copies.setdefault(_copies(p.grad, holders), []).append(local)
    device = next((g.device for grads in by_copies.values() for g in grads), torch.device("cpu"))
    total = torch.zeros((), dtype=torch.float32, device=device)
    for copies, grads in by_copies.items():
        total += get_total_norm(grads, 2.0).float().square() / copies
    if poison is not None:
        total += torch.where(poison.to(device), math.inf, 0.0)
    if distributed:
        dist.all_reduce(total)
    for grad in partial:  # exact, one collective each
        total += torch.linalg.vector_norm(grad, 2, dtype=torch.float32).full_tensor().square()
    return total.sqrt()


def clip_grad_norm_(
    params: list[nn.Parameter],
    max_norm: float | None,
    pipeline_stages: int = 1,
    poison: torch.Tensor | None = None,
) -> torch.Tensor:
    """Clip gradients to a global norm of `max_norm` (None: measure only); returns the norm
    before, a device scalar (read it on the host only when it is logged). `poison`: as in
    global_grad_norm.

    torch.nn.utils.clip_grads_with_norm_ would do the scaling, but refuses a mix of DTensor and
    plain gradients; the local pieces are scaled here the same way (one foreach multiply)."""
    norm = global_grad_norm(params, pipeline_stages, poison)
    if max_norm is not None:
        # a non-finite norm leaves the gradients as they are: the step is skipped
        coef = torch.where(torch.isfinite(norm), torch.clamp(max_norm / (norm + 1e-6), max=1.0), 1.0)
        grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, coef.to(grads[0].device))
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
