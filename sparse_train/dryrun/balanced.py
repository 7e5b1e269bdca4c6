"""Balanced routing for the dry run: the dispatcher's split sizes without reading the router.

A dropless all-to-all dispatch needs, on the host, how many rows each rank sends to each
other rank (`AllToAllDispatcher.plan` reads them back): data that fake tensors do not have. The
dry run supplies them as if routing were perfectly balanced: each of this rank's T tokens
sends its k assignments to k consecutive ranks (mod ep), so every rank sends and receives
T·k/ep assignments from every other (the remainder spread over the first ranks), one row per
assignment (no token is deduplicated), spread evenly over each rank's local experts. Every
tensor of the plan is built on the device from shapes alone; the routing weights are still
the router's, so the backward reaches the router as in a real step.

What this cannot show: a skewed step's sizes (the memory of the busiest rank under skew is
`sparse-train bench memory`'s business), and the dispatcher's own host read of the split
sizes, which is by design (docs/gpu.md).
"""

from __future__ import annotations

import torch

from sparse_train.models.routers import Routing
from sparse_train.parallel.dispatch import AllToAllDispatcher, DispatchPlan


def balanced_counts(tokens: int, top_k: int, ep: int) -> list[int]:
    """Assignments one rank sends to each destination: T·k split as evenly as possible."""
    total = tokens * top_k
    return [total // ep + (d < total % ep) for d in range(ep)]


def balanced_plan(dispatcher: AllToAllDispatcher, x_TD: torch.Tensor, routing: Routing) -> DispatchPlan:
    """A DispatchPlan of balanced routing for `x_TD` (see the module docstring); no host read."""
    T, k = routing.experts_Tk.shape
    ep, device = dispatcher.ep, x_TD.device
    send = balanced_counts(T, k, ep)
    recv = [balanced_counts(T, k, ep)[dispatcher.rank]] * ep  # every rank sends this rank the same
    A = T * k
    assignment_A = torch.arange(A, device=device)
    # assignments grouped by destination: d's block is the d-th slice of T·k
    destination_A = torch.repeat_interleave(
        torch.arange(ep, device=device), torch.tensor(send).to(device), output_size=A
    )
    first_of_destination = torch.tensor([sum(send[:d]) for d in range(ep)]).to(device)
    row_in_block_A = assignment_A - first_of_destination[destination_A]
    local_expert_A = row_in_block_A % dispatcher.num_local
    recv_counts = torch.tensor([[r, r] for r in recv]).to(device)
    return DispatchPlan(
        pair_token_P=assignment_A % T,
        meta_A2=torch.stack([row_in_block_A, local_expert_A], dim=1),
        weight_A=routing.weights_Tk.reshape(-1),
        recv_counts=recv_counts,
        send_rows=send,
        recv_rows=recv,
        send_assign=send,
        recv_assign=recv,
    )


def install(module: torch.nn.Module) -> int:
    """Give every all-to-all dispatcher in `module` the balanced plan; how many there were."""
    count = 0
    for sub in module.modules():
        dispatcher = getattr(sub, "dispatcher", None)
        if isinstance(dispatcher, AllToAllDispatcher):
            dispatcher.plan = lambda x, routing, d=dispatcher: balanced_plan(d, x, routing)
            count += 1
    return count
