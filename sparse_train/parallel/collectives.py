"""Autograd-aware collectives for tensor-parallel regions (Megatron's f and g operators).

Inside a tensor-parallel region every rank holds the same input and a shard of the weights.

    copy_to_group      forward: identity      backward: all-reduce (sum) of the input gradient
    reduce_from_group  forward: all-reduce    backward: identity

`torch.distributed.nn.functional.all_reduce` all-reduces in both directions, which would
multiply the gradient by the group size here: every rank already holds the whole loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def copy_to_group(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return _CopyToGroup.apply(x, group)


def reduce_from_group(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return _ReduceFromGroup.apply(x, group)


class SumOverGroup:
    """`counts -> counts summed over the ranks of group`, in place (a CountSync's rank reduction)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, group=self.group)
        return t


class SumOverRanks:
    """`t -> t summed over the ranks of group`, differentiable: the backward sums the gradients
    over the ranks too, since every rank's result depends on every rank's input (Sinkhorn's
    sums over the data-parallel batch, when its plan carries gradients)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        from torch.distributed.nn.functional import all_reduce

        return all_reduce(t, group=self.group)
