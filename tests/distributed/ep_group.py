"""Shared setup of the layer-level expert-parallel tests: every rank in one EP group."""

from __future__ import annotations


def init_expert_parallel():
    """Start gloo and return (rank, world, dims, meshes) with ep = dp_shard = the world size."""
    import torch.distributed as dist

    from sparse_train.parallel.dims import ParallelDims

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dims = ParallelDims(dp_replicate=1, dp_shard=world, ep=world, tp=1, pp=1, world_size=world)
    return rank, world, dims, dims.build_meshes("cpu")
