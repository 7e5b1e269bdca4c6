"""Tensor parallelism for the dense parts of a block, with DTensor's `parallelize_module`.

    attention   wq, wk, wv column-parallel (heads split over TP ranks), wo row-parallel;
                sink logits sharded with the heads; q/k norms per head replicated (their
                weight's gradient summed over the ranks), over the whole projection sharded
                (their mean square summed over the ranks)
    latent      q_up (or wq) and kv_up column-parallel (heads split), wo row-parallel; the
    attention   down projections and latent norms replicated (their inputs are), the shared
                rotary key's gradient summed over the ranks
    dense FFN   w_gate, w_up column-parallel, w_down row-parallel (also the shared experts)

Column-parallel layers take the replicated input and all-reduce its gradient; row-parallel
ones all-reduce their partial outputs, so activations between blocks stay replicated. The
attention code reads head counts from the projections' outputs, so it runs unchanged on
n_heads / tp local heads. Embeddings, norms, routers and the output projection stay
replicated; the routed experts are sharded by sparse_train.parallel.expert.
"""

from __future__ import annotations

from functools import partial

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from sparse_train.models.attention import Attention, LatentAttention, QKNorm
from sparse_train.models.experts import SwiGLU
from sparse_train.parallel.collectives import SumOverRanks, copy_to_group


def _swiglu_plan(prefix: str) -> dict[str, object]:
    return {
        f"{prefix}w_gate": ColwiseParallel(),
        f"{prefix}w_up": ColwiseParallel(),
        f"{prefix}w_down": RowwiseParallel(),
    }


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Shard attention and dense SwiGLU projections of every block over the "tp" mesh in place."""
    plan: dict[str, object] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, Attention | LatentAttention):
            heads = ("wq", "wk", "wv") if isinstance(module, Attention) else ("wq", "q_up", "kv_up")
            plan.update({f"{prefix}{p}": ColwiseParallel() for p in heads if getattr(module, p) is not None})
            plan[f"{prefix}wo"] = RowwiseParallel()
        elif isinstance(module, SwiGLU):
            plan.update(_swiglu_plan(prefix))
    if plan:
        parallelize_module(model, tp_mesh, plan)
    for module in model.modules():
        if isinstance(module, Attention):
            _shard_head_parameters(module, tp_mesh)
        elif isinstance(module, LatentAttention):  # the shared rotary key reaches every rank's heads
            module.rope_key_in = partial(copy_to_group, group=tp_mesh.get_group())


def _shard_head_parameters(attn: Attention, tp_mesh: DeviceMesh) -> None:
    """The attention parameters that belong to heads but are not projections."""
    group = tp_mesh.get_group()
    if attn.sinks is not None:
        attn.sinks = nn.Parameter(distribute_tensor(attn.sinks.detach(), tp_mesh, [Shard(0)]))
    for norm in (attn.q_norm, attn.k_norm):
        if not isinstance(norm, QKNorm):
            continue
        if norm.head_dim is not None:  # one [Dh] weight for every head: each rank's heads add to its gradient
            norm.weight_in = partial(copy_to_group, group=group)
        else:  # over the whole projection: the weight goes with the heads, the mean square over all of them
            norm.weight = nn.Parameter(distribute_tensor(norm.weight.detach(), tp_mesh, [Shard(0)]))
            norm.sum_shards = SumOverRanks(group)
