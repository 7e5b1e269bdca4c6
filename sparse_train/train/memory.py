"""Peak memory of this process as a user sees it: the most the device allocated (CUDA), or the
process's peak resident set (CPU, Linux: getrusage reports KiB)."""

from __future__ import annotations

import resource

import torch
import torch.distributed as dist


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def per_rank(values: list[float], device: torch.device, distributed: bool) -> list[list[float]]:
    """Every rank's `values`, by rank, on every rank (one all-reduce of a [world, n] table: works
    on every backend, unlike gathers of uneven objects)."""
    if not distributed:
        return [list(values)]
    table = torch.zeros(dist.get_world_size(), len(values), dtype=torch.float64, device=device)
    table[dist.get_rank()] = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(table)
    return table.tolist()
