"""Balanced routing: the dispatchers' sizes without reading the router. The dry run needs it
(fake tensors have no values); `sparse-train bench dispatch --balanced-routing` uses it on real tensors
to measure what perfectly balanced routing sends, the case the planner predicts exactly.

Expert-parallel dispatch is data-dependent by design: the all-to-all needs, on the host, how
many rows each rank sends to each other rank (`AllToAllDispatcher.plan` reads them back), and
the all-gather dispatcher how many gathered assignments its experts serve
(`AllGatherDispatcher.local_assignments`). Fake tensors have no such values, so the dry run
supplies them as if routing were perfectly balanced:

- all-to-all: this rank's T·k assignments are dealt out in contiguous blocks of T·k/ep to the ep
  ranks (the remainder to the first ones), one row per assignment (nothing deduplicated), spread
  over each rank's local experts; every rank sends this rank as many as it sends each one;
- all-gather: each rank's experts serve T·k of the ep·T·k gathered assignments.

Every tensor of a plan is built on the device from shapes alone; the routing weights are still
the router's, so the backward reaches the router as in a real step.

What this cannot show: a skewed step's sizes (the memory of the busiest rank under skew is
`sparse-train bench memory`'s business), and the dispatchers' own host reads, which are by
design (docs/gpu.md).
"""

from __future__ import annotations

import torch

from sparse_train.models.routers import Routing
from sparse_train.parallel.dispatch import AllGatherDispatcher, AllToAllDispatcher, DispatchPlan


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
    # the same counts made on the device (a tensor from host data would be a copy per call)
    destinations = torch.arange(ep, device=device)
    send_counts = (destinations < A % ep).long() + A // ep
    # assignments grouped by destination: d's block is the d-th slice of T·k
    destination_A = torch.repeat_interleave(destinations, send_counts, output_size=A)
    first_of_destination = torch.cumsum(send_counts, 0) - send_counts
    row_in_block_A = assignment_A - first_of_destination[destination_A]
    local_expert_A = row_in_block_A % dispatcher.num_local
    recv_counts = torch.full((ep, 2), recv[0], device=device, dtype=torch.long)
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


def balanced_local_assignments(
    dispatcher: AllGatherDispatcher, all_e: torch.Tensor, all_kept: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """T·k (gathered token, slot) pairs for this rank's experts, of the ep·T·k gathered; no host read."""
    gathered_tokens, k = all_e.shape
    served = gathered_tokens * k // dispatcher.ep
    n = torch.arange(served, device=all_e.device)
    return n % gathered_tokens, (n // gathered_tokens) % k


def install(module: torch.nn.Module) -> int:
    """Give every expert-parallel dispatcher in `module` its balanced stand-in; how many there were."""
    count = 0
    for sub in module.modules():
        dispatcher = getattr(sub, "dispatcher", None)
        if isinstance(dispatcher, AllToAllDispatcher):
            dispatcher.plan = lambda x, routing, d=dispatcher: balanced_plan(d, x, routing)
        elif isinstance(dispatcher, AllGatherDispatcher):
            dispatcher.local_assignments = lambda e, kept, d=dispatcher: balanced_local_assignments(d, e, kept)
        else:
            continue
        count += 1
    return count
