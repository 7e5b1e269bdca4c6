"""Tensor parallelism for the dense parts of a block, with DTensor's `parallelize_module`.

    attention   wq, wk, wv column-parallel (heads split over TP ranks), wo row-parallel
    dense FFN   w_gate, w_up column-parallel, w_down row-parallel (also the shared experts)

Column-parallel layers take the replicated input and all-reduce its gradient; row-parallel
ones all-reduce their partial outputs, so activations between blocks stay replicated. The
attention code reads head counts from the projections' outputs, so it runs unchanged on
n_heads / tp local heads. Embeddings, norms, routers and the output projection stay
replicated; the routed experts are sharded by sparse_train.parallel.expert.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from sparse_train.models.experts import SwiGLU
from sparse_train.models.transformer import Attention


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
        if isinstance(module, Attention):
            plan.update({f"{prefix}{p}": ColwiseParallel() for p in ("wq", "wk", "wv")})
            plan[f"{prefix}wo"] = RowwiseParallel()
        elif isinstance(module, SwiGLU):
            plan.update(_swiglu_plan(prefix))
    if plan:
        parallelize_module(model, tp_mesh, plan)
