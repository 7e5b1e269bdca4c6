"""Expert parallelism (and expert tensor parallelism), applied to a built single-device model.

For every sparse layer (MoE experts, and FFF leaves alike):
  - the stacked expert (leaf) weights become DTensors on the expert mesh's ("ep", "tp") dims: experts
    sharded over EP ranks (dim 0), each expert's hidden width over TP ranks (the F dim), so a
    rank computes E/ep experts of width F/tp;
  - under EP the layer's dispatcher is swapped for an all-to-all (or all-gather) one that moves
    tokens to the ranks holding their experts (sparse_train.parallel.dispatch);
  - under TP the experts' input gradient is all-reduced and their partial outputs summed over
    the TP ranks (SwiGLUExperts' enter_tp/sum_tp seams, other experts' distribute_module
    input/output hooks; parameter names stay unchanged); the experts' down bias (gpt-oss) is
    whole on every TP rank and added after that sum, once;
  - a global_batch balancing loss sums its expert counts over the data-parallel ranks.

Model code never sees a process group: everything here is installed from outside.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor

from sparse_train.config import ParallelConfig
from sparse_train.models.dispatch import ExpertInput
from sparse_train.models.experts import SwiGLUExperts
from sparse_train.models.losses import GlobalBatchCounts
from sparse_train.models.sparse import SparseFFN
from sparse_train.parallel.collectives import SumOverGroup, SumOverRanks, copy_to_group, reduce_from_group
from sparse_train.parallel.dims import Meshes, ParallelDims
from sparse_train.parallel.dispatch import AllGatherDispatcher, AllToAllDispatcher

# Per stacked expert parameter, the dim sharded over ("ep", "tp"): experts, then hidden units
# (None: whole on every TP rank).
EXPERT_SHARD_DIMS: dict[str, tuple[int, int | None]] = {
    "w_gate_up": (0, 3),
    "w_down": (0, 1),
    "b_gate_up": (0, 2),
    # SwiGLUExperts._add_down_bias adds it after the TP sum, the same on every TP rank: replicated
    "b_down": (0, None),
    "w_in": (0, 2),
    "w_out": (0, 1),  # GELUExperts
}


def _shard_experts(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
    for param_name, (expert_dim, hidden_dim) in EXPERT_SHARD_DIMS.items():
        full = getattr(module, param_name, None)
        if not isinstance(full, nn.Parameter) or isinstance(full.data, DTensor):
            continue
        over_tp = Replicate() if hidden_dim is None else Shard(hidden_dim)
        sharded = distribute_tensor(full.detach(), mesh, [Shard(expert_dim), over_tp])
        module.register_parameter(param_name, nn.Parameter(sharded, requires_grad=full.requires_grad))


def _tp_region(mesh: DeviceMesh):
    """(enter, total) making the experts a tensor-parallel region over the mesh's "tp" dim."""
    group = mesh.get_group("tp")

    def enter(inp: ExpertInput) -> ExpertInput:
        # Each TP rank's backward sees only its hidden units: the gradients of the rows and of
        # the routing weights it returns are partial sums over the TP ranks.
        weight = copy_to_group(inp.weight_A, group) if inp.weight_A is not None else None
        return replace(inp, x=copy_to_group(inp.x, group), weight_A=weight)

    def total(y: torch.Tensor) -> torch.Tensor:
        return reduce_from_group(y, group)

    return enter, total


def _tp_hooks(mesh: DeviceMesh):
    """The region as distribute_module input/output hooks, for experts without the seams."""
    enter, total = _tp_region(mesh)

    def input_fn(_module: nn.Module, inputs: tuple, _mesh: DeviceMesh) -> tuple:
        (inp,) = inputs
        return (enter(inp),)

    def output_fn(_module: nn.Module, y: torch.Tensor, _mesh: DeviceMesh) -> torch.Tensor:
        return total(y)

    return input_fn, output_fn


def apply_expert_parallel(model: nn.Module, dims: ParallelDims, meshes: Meshes, cfg: ParallelConfig) -> None:
    """Shard every sparse layer's experts (leaves) over EP x TP; install its dispatcher and count sync."""
    mesh = meshes.expert[("ep", "tp")]
    dp_group = meshes.dp.get_group() if dims.dp > 1 else None
    for layer in (m for m in model.modules() if isinstance(m, SparseFFN)):
        if isinstance(layer.count_sync, GlobalBatchCounts) and dp_group is not None:
            layer.count_sync.reduce_across_ranks = SumOverGroup(dp_group)
        router = getattr(layer, "router", None)
        if getattr(router, "token_sum", None) is not None and dp_group is not None:
            router.token_sum = SumOverRanks(dp_group)  # Sinkhorn balances the whole data-parallel batch
        if dims.ep == 1 and dims.tp == 1:
            continue
        hooks = (None, None)
        if dims.tp > 1 and isinstance(layer.experts, SwiGLUExperts):
            # its seams: the down bias is added after the TP sum, inside forward (FSDP's unit)
            layer.experts.enter_tp, layer.experts.sum_tp = _tp_region(mesh)
        elif dims.tp > 1:
            hooks = _tp_hooks(mesh)
        distribute_module(layer.experts, mesh, _shard_experts, *hooks)
        if dims.ep > 1:
            group = meshes.expert["ep"].get_group()
            if cfg.ep_dispatcher == "allgather":
                layer.dispatcher = AllGatherDispatcher(layer.num_experts, group)
            else:
                layer.dispatcher = AllToAllDispatcher(layer.num_experts, group, dedup=cfg.ep_dedup)
