"""Row moves for the MoE layer, differentiable, with torch and Triton implementations.

    permute(x, index)                       out[i] = x[index[i]]            (gather into expert order)
    unpermute(y, index, weight, num_rows)   out[index[i]] += weight[i]*y[i] (weighted scatter-add back)
    count_per_expert(experts, E)            out[e] = #{i: experts[i] == e}  (rows per expert group)

`index` may repeat in both (a token routed to k experts appears k times). Gradients flow to x,
to y and to the routing weights.
"""

from __future__ import annotations

import torch

from sparse_train.kernels.grouped_gemm import Backend, resolve_backend


def count_per_expert(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 `[E]` occurrences of each expert id. A scatter-add rather than bincount, whose
    output shape depends on the data and breaks torch.compile graphs."""
    flat = experts.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def _gather(x: torch.Tensor, index: torch.Tensor, scale: torch.Tensor | None, backend: str) -> torch.Tensor:
    if backend == "triton":
        from sparse_train.kernels.triton_kernels import gather_rows_triton

        return gather_rows_triton(x, index, scale)
    out = x.index_select(0, index)
    return out if scale is None else out.mul_(scale.to(out.dtype)[:, None])


def _scatter_add(y: torch.Tensor, index: torch.Tensor, weight: torch.Tensor | None, num_rows: int, backend: str):
    if backend == "triton":
        from sparse_train.kernels.triton_kernels import scatter_add_rows_triton

        return scatter_add_rows_triton(y, index, num_rows, weight)
    src = y if weight is None else y * weight.to(y.dtype)[:, None]
    return y.new_zeros(num_rows, y.shape[1]).index_add_(0, index, src)


@torch.library.custom_op("sparse_train::permute", mutates_args=())
def _permute_op(x: torch.Tensor, index: torch.Tensor, backend: str) -> torch.Tensor:
    return _gather(x, index, None, backend)


@_permute_op.register_fake
def _(x, index, backend):
    return x.new_empty(index.shape[0], x.shape[1])


@torch.library.custom_op("sparse_train::unpermute", mutates_args=())
def _unpermute_op(
    y: torch.Tensor, index: torch.Tensor, weight: torch.Tensor | None, num_rows: int, backend: str
) -> torch.Tensor:
    return _scatter_add(y, index, weight, num_rows, backend)


@_unpermute_op.register_fake
def _(y, index, weight, num_rows, backend):
    return y.new_empty(num_rows, y.shape[1])


def _permute_setup(ctx, inputs, output) -> None:
    x, index, backend = inputs
    ctx.save_for_backward(index)
    ctx.num_rows, ctx.backend = x.shape[0], backend


def _permute_backward(ctx, grad_out):
    (index,) = ctx.saved_tensors
    return _unpermute_op(grad_out, index, None, ctx.num_rows, ctx.backend), None, None


def _unpermute_setup(ctx, inputs, output) -> None:
    y, index, weight, num_rows, backend = inputs
    ctx.save_for_backward(y, index, weight)
    ctx.backend = backend


def _unpermute_backward(ctx, grad_out):
    y, index, weight = ctx.saved_tensors
    grad_y = grad_weight = None
    if ctx.needs_input_grad[0]:
        grad_y = _permute_op(grad_out, index, ctx.backend)
        if weight is not None:
            grad_y = grad_y * weight.to(grad_y.dtype)[:, None]
    if weight is not None and ctx.needs_input_grad[2]:
        grad_weight = (grad_out.index_select(0, index).float() * y.float()).sum(dim=-1).to(weight.dtype)
    return grad_y, None, grad_weight, None, None


_permute_op.register_autograd(_permute_backward, setup_context=_permute_setup)
_unpermute_op.register_autograd(_unpermute_backward, setup_context=_unpermute_setup)


def permute(x: torch.Tensor, index: torch.Tensor, *, backend: Backend = "auto") -> torch.Tensor:
    """Rows of x in the order `index` gives (rows may repeat): out[i] = x[index[i]]."""
    backend = resolve_backend(backend, x.device)
    if backend == "reference":
        return x[index]
    return _permute_op(x, index, backend)


def unpermute(
    y: torch.Tensor,
    index: torch.Tensor,
    weight: torch.Tensor | None,
    num_rows: int,
    *,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Weighted scatter-add of rows back to their origin: out[index[i]] += weight[i] * y[i]."""
    backend = resolve_backend(backend, y.device)
    if backend == "reference":
        out = y.new_zeros(num_rows, y.shape[1])
        src = y if weight is None else y * weight.to(y.dtype)[:, None]
        return out.index_add(0, index, src)
    return _unpermute_op(y, index, weight, num_rows, backend)
