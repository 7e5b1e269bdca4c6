"""The distributed runtime of one training process: process group, meshes, and this rank's coordinates.

`init_distributed` validates the layout against the world size and the model *before* any
process group exists (a bad layout is a one-line ConfigError, exit status 2), then starts
the process group: NCCL on CUDA, gloo on CPU, chosen from the device.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sparse_train.config import Config
from sparse_train.parallel.dims import Meshes, ParallelDims, world_from_env


@dataclass
class DistributedRuntime:
    dims: ParallelDims
    meshes: Meshes
    rank: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        return self.meshes.dp.get_local_rank()

    @property
    def pp_rank(self) -> int:
        return self.meshes.world.get_local_rank("pp")

    def group(self, dim: str) -> dist.ProcessGroup:
        return self.meshes.mesh_of(dim).get_group()

    def agree(self, value: str) -> str:
        """The main rank's `value` on every rank (e.g. a run directory named by its clock)."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def layout_for(cfg: Config) -> ParallelDims:
    """The validated layout for this process's world size (WORLD_SIZE, 1 without torchrun)."""
    dims = ParallelDims.from_config(cfg.parallel, world_from_env()[2])
    dims.check_model(cfg)
    return dims


def init_distributed(cfg: Config, device: torch.device, timeout_s: float | None = None) -> DistributedRuntime | None:
    """Start torch.distributed for a multi-process run; None for a single process."""
    dims = layout_for(cfg)
    if not dims.is_distributed:
        return None
    rank, local_rank, _ = world_from_env()
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    # DTensor warns on every multi-dim reduction (e.g. a gradient norm over (edp, ep, tp)); they
    # are small here, and the warning would repeat on every rank and step.
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s or float(os.environ.get("SPARSE_TRAIN_DIST_TIMEOUT", 600)))
        backend = process_group_backend(device.type)
        store = _restart_safe_store(timeout)
        if store is None:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_from_env()[2], timeout=timeout)
    return DistributedRuntime(dims, dims.build_meshes(device.type), rank, local_rank, device)


def process_group_backend(device_type: str) -> str:
    """gloo on CPU. On CUDA, NCCL for CUDA tensors and gloo for CPU ones in the same groups
    (decision 45): the training step keeps its collectives on the device, while object
    collectives, DCP's planning and an asynchronous save's CPU-side traffic are served too."""
    return "cuda:nccl,cpu:gloo" if device_type == "cuda" else "gloo"


def _restart_safe_store(timeout: datetime.timedelta) -> dist.Store | None:
    """Under torchrun, the agent's store with keys scoped to this restart attempt.

    torchrun keeps one agent-hosted store across `--max-restarts` restarts, so the workers of a
    restart read the peer addresses the dead workers published and gloo fails to connect
    ("connectFullMesh failed ... Connection refused"; pytorch/pytorch#167288, seen here with
    torch 2.13). Prefixing every key with the attempt number gives each attempt a clean slate.
    None (plain env:// rendezvous) outside torchrun's agent store."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    return dist.PrefixStore(f"sparse_train/attempt{attempt}", client)
