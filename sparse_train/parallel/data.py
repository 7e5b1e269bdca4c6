"""Data parallelism with FSDP2 (`fully_shard`) over the data-parallel ranks.

    non-expert parameters  sharded over "dp_shard", replicated over "dp_replicate" (HSDP when
                           both are > 1); gradients averaged over all dp ranks
    routed experts         and FFF leaves: their own FSDP unit on the expert mesh's "edp" ranks
                           (those holding the same experts). Their gradient already sums the contributions of
                           the whole EP group's tokens, so it is divided by dp, not edp: the
                           average over all dp ranks' losses, as for every other parameter.

Units: experts, then every block, then the root (embeddings, final norm, output projection).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard

from sparse_train.models.sparse import SparseFFN
from sparse_train.parallel.dims import Meshes, ParallelDims


def data_parallel_mesh(dims: ParallelDims, meshes: Meshes):
    if dims.dp_replicate > 1:
        return meshes.world["dp_replicate", "dp_shard"]  # 2-D: FSDP2 replicates over dim 0 (HSDP)
    return meshes.world["dp_shard"]


def even_expert_shards(edp: int):
    """FSDP2's placement of an expert weight over the `edp` ranks: dimension 0 (the local experts)
    when it splits evenly, else the first dimension that does and that tp and ep leave whole.
    FSDP2 pads dimension 0 to a multiple of the ranks, so a large data-parallel world over few
    local experts would gather mostly padding (16 experts over 128 ranks: 8x the weights, in
    memory and on the wire); torchtitan places its experts the same way."""

    def place(param: nn.Parameter) -> Shard | None:
        local = param.to_local() if isinstance(param, DTensor) else param
        taken = {p.dim for p in param.placements if isinstance(p, Shard)} if isinstance(param, DTensor) else set()
        dim = expert_shard_dim(tuple(local.shape), taken, edp)
        return None if dim == 0 else Shard(dim)  # None: FSDP's default, Shard(0)

    return place


def expert_shard_dim(local_shape: tuple[int, ...], taken: set[int], edp: int) -> int:
    """The dimension FSDP shards an expert weight of this (ep- and tp-local) shape on (above)."""
    if local_shape[0] % edp == 0:
        return 0
    return next((d for d in range(1, len(local_shape)) if d not in taken and local_shape[d] % edp == 0), 0)


def apply_data_parallel(module: nn.Module, dims: ParallelDims, meshes: Meshes) -> None:
    if dims.dp == 1:
        return
    dp_mesh = data_parallel_mesh(dims, meshes)
    # Under a pipeline every unit would be gathered again for each micro-batch's forward and
    # backward; kept gathered, it is gathered once per step (torchtitan's choice too)
    reshard = dims.pp == 1
    sharded_experts = dims.ep > 1 or dims.tp > 1  # DTensors on the expert mesh: their own unit
    for layer in (m for m in module.modules() if isinstance(m, SparseFFN)):
        if sharded_experts:
            fully_shard(
                layer.experts,
                mesh=meshes.expert["edp"],
                shard_placement_fn=even_expert_shards(dims.edp),
                reshard_after_forward=reshard,
            )
            layer.experts.set_gradient_divide_factor(float(dims.dp))
            if dims.edp > 1:
                # plain sums plus a local division: gloo has no pre-multiplied sum (PREMUL_SUM).
                # Not on one rank, where FSDP2 (torch 2.13) would then divide twice.
                layer.experts.set_force_sum_reduction_for_comms(True)
    blocks = module.blocks.values() if isinstance(module.blocks, nn.ModuleDict) else module.blocks
    for block in [*blocks, *getattr(module, "mtp", ())]:  # multi-token prediction modules: one unit each
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard)
    fully_shard(module, mesh=dp_mesh)  # the root: FSDP keeps it gathered from forward to backward
