"""ParallelDims: the parallel layout, validated against the world size, and its named DeviceMeshes.

Every rank has a coordinate in the mesh ("pp", "dp_replicate", "dp_shard", "tp"), outermost
first, so the tp ranks of one data-parallel rank are neighbours (on GPUs: the same node).

Expert parallelism adds no ranks: it folds into the data-parallel ones, as torchtitan's and
Megatron's "parallel folding" do. The dp = dp_replicate * dp_shard data-parallel ranks of one
(pp, tp) coordinate are viewed as a grid ("edp", "ep") with the "ep" coordinate fastest:

    dp rank d  ->  ep rank   d % ep    which slice of the experts it holds
                   edp rank  d // ep   which replica of that slice

Non-expert parameters are reduced over all dp ranks ("dp" mesh); expert parameters only over
their "edp" ranks, the ranks holding the same experts (docs/decisions.md, decision 15).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from sparse_train.config import Config, ConfigError, ParallelConfig


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    ep: int
    tp: int
    pp: int
    world_size: int

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int) -> ParallelDims:
        """Resolve dp_shard = -1 to the remaining ranks, then validate every degree."""
        dp_shard = cfg.dp_shard
        if dp_shard == -1:
            others = cfg.dp_replicate * cfg.tp * cfg.pp
            if world_size % others:
                named = f"dp_replicate({cfg.dp_replicate}) * tp({cfg.tp}) * pp({cfg.pp})"
                raise ConfigError("parallel", f"{named} = {others} does not divide WORLD_SIZE({world_size})")
            dp_shard = world_size // others
        dims = cls(cfg.dp_replicate, dp_shard, cfg.ep, cfg.tp, cfg.pp, world_size)
        dims.validate()
        return dims

    def validate(self) -> None:
        product = self.dp_replicate * self.dp_shard * self.tp * self.pp
        if product != self.world_size:
            named = f"dp_replicate({self.dp_replicate}) * dp_shard({self.dp_shard}) * tp({self.tp}) * pp({self.pp})"
            raise ConfigError("parallel", f"{named} = {product} != WORLD_SIZE({self.world_size})")
        if self.dp % self.ep:
            raise ConfigError(
                "parallel.ep",
                f"must divide the data-parallel ranks dp_replicate({self.dp_replicate}) * dp_shard({self.dp_shard}) "
                f"= {self.dp} that expert parallelism borrows, got {self.ep}",
            )

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def edp(self) -> int:
        """Replicas of each expert slice: the ranks expert gradients are reduced over."""
        return self.dp // self.ep

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        return (
            f"dp_replicate={self.dp_replicate} dp_shard={self.dp_shard} ep={self.ep} (edp={self.edp}) "
            f"tp={self.tp} pp={self.pp} on {self.world_size} ranks"
        )

    def check_model(self, cfg: Config) -> None:
        """Layout constraints that depend on the model and batch; raised before any process group exists."""
        m, t = cfg.model, cfg.train
        if m.ffn == "moe" and cfg.moe.num_experts % self.ep:
            raise ConfigError("parallel.ep", f"must divide moe.num_experts ({cfg.moe.num_experts}), got {self.ep}")
        if m.ffn == "fff" and cfg.fff.num_leaves % self.ep:
            raise ConfigError(
                "parallel.ep",
                f"must divide the FFF leaf count 2^fff.depth ({cfg.fff.num_leaves}), got {self.ep}",
            )
        if self.pp > m.n_layers:
            raise ConfigError("parallel.pp", f"must be <= model.n_layers ({m.n_layers}), got {self.pp}")
        if self.pp > 1 and t.grad_accum < self.pp:
            raise ConfigError(
                "parallel.pp",
                f"1F1B runs train.grad_accum ({t.grad_accum}) micro-batches per step, which must be >= pp ({self.pp})",
            )
        kv_heads = m.n_kv_heads or m.n_heads
        if m.n_heads % self.tp or kv_heads % self.tp:
            raise ConfigError(
                "parallel.tp",
                f"must divide model.n_heads ({m.n_heads}) and the key/value heads ({kv_heads}), got {self.tp}",
            )
        if m.ffn_hidden % self.tp:
            raise ConfigError("parallel.tp", f"must divide model.ffn_hidden ({m.ffn_hidden}), got {self.tp}")
        if m.ffn == "moe":
            shared = cfg.moe.num_shared_experts * (cfg.moe.shared_expert_hidden or cfg.moe.expert_hidden)
            if cfg.moe.expert_hidden % self.tp or shared % self.tp:
                raise ConfigError(
                    "parallel.tp",
                    f"must divide moe.expert_hidden ({cfg.moe.expert_hidden}) and the shared experts' width "
                    f"({shared}), got {self.tp}",
                )
        if m.ffn == "fff":
            master = (cfg.fff.master_leaf_width or cfg.fff.leaf_width) if cfg.fff.master_leaf else 0
            if cfg.fff.leaf_width % self.tp or master % self.tp:
                raise ConfigError(
                    "parallel.tp",
                    f"must divide fff.leaf_width ({cfg.fff.leaf_width}) and the master leaf's width ({master}), "
                    f"got {self.tp}",
                )
        if t.batch_size % self.dp:
            raise ConfigError(
                "train.batch_size",
                f"sequences per micro-batch, split over the {self.dp} data-parallel ranks: must be divisible by "
                f"{self.dp}, got {t.batch_size}",
            )
        if self.dp > 1 and t.eval_batches * t.batch_size % self.dp:
            raise ConfigError("train.eval_batches", "validation batches must split evenly over the data-parallel ranks")

    def build_meshes(self, device_type: str) -> Meshes:
        """The named meshes over the current process group (every rank must call this)."""
        world = init_device_mesh(
            device_type,
            (self.pp, self.dp_replicate, self.dp_shard, self.tp),
            mesh_dim_names=("pp", "dp_replicate", "dp_shard", "tp"),
        )
        dp = world[("dp_replicate", "dp_shard")]._flatten("dp")
        # The same ranks, regrouped for experts: dp rank d = edp * ep + ep_rank (see the module doc).
        ranks = torch.arange(self.world_size).view(self.pp, self.edp, self.ep, self.tp)
        expert = DeviceMesh(device_type, ranks, mesh_dim_names=("pp", "edp", "ep", "tp"))
        return Meshes(world, dp, expert)


@dataclass(frozen=True)
class Meshes:
    """`world`: ("pp", "dp_replicate", "dp_shard", "tp"); `dp`: its two data-parallel dims
    flattened; `expert`: ("pp", "edp", "ep", "tp") over the same ranks."""

    world: DeviceMesh
    dp: DeviceMesh
    expert: DeviceMesh

    def mesh_of(self, dim: str) -> DeviceMesh:
        if dim == "dp":
            return self.dp
        return self.expert[dim] if dim in ("edp", "ep") else self.world[dim]


def world_from_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) as torchrun sets them; (0, 0, 1) without it."""
    return (
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("LOCAL_RANK", "0")),
        int(os.environ.get("WORLD_SIZE", "1")),
    )
