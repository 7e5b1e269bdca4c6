"""Expert-parallel token dispatchers: the same seam as models.dispatch.LocalDispatcher, across ranks.

Each rank of the EP group holds `num_experts / ep` consecutive experts. Both dispatchers are
differentiable end to end (tokens, routing weights), work when a rank receives no token at all,
and under any skew.

AllToAllDispatcher
  1. exchange how many rows and assignments each rank will send to each other rank (with
     step 3's bookkeeping, this is `plan`: the only data-dependent part, swappable);
  2. send the token rows with one uneven `all_to_all_single`. With `dedup` (default) a token
     routed to several experts that live on the same rank is sent there once and fanned out on
     arrival: rows sent = distinct (token, destination rank) pairs, the minimum possible;
  3. send, per assignment, (row, local expert, routing weight): the receiving rank runs its
     local experts on the received rows sorted by local expert and sums the weighted outputs
     per row (kernels.swiglu_experts);
  4. `combine` returns one row per sent row with the reverse all-to-all and scatter-adds them
     onto their tokens.

AllGatherDispatcher
  For small EP groups: gather every rank's tokens and routing, run the local experts on the
  assignments that chose them (`local_assignments`, the data-dependent part), and
  reduce-scatter the partial outputs back. More bytes, two
  collectives of fixed size, no count exchange.

Shape legend: T tokens on this rank, D width, A kept assignments, P rows sent, R rows received.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as funcol

from sparse_train.kernels import count_per_expert, permute, unpermute
from sparse_train.models.dispatch import ExpertInput, sort_assignments
from sparse_train.models.routers import Routing


@dataclass
class DispatchStats:
    """What dispatch + combine moved.

    bytes_sent / bytes_min   token payload the last forward dispatch + combine sent to other
                             ranks, and the minimum possible: each token once per distinct
                             remote rank that holds one of its experts, there and back
    received_rows            token rows this rank's experts received in the last dispatch
    total_* / comm_seconds   running sums since `reset()`: bytes as above, distinct (token,
                             remote rank) pairs and tokens dispatched (their ratio: the remote
                             peers of a token), and wall time spent inside the token
                             collectives, forward and backward
    total_call_bytes         every all-to-all call's larger buffer (sent or received, the local
                             block included), summed since `reset()`, forward and backward:
                             the per-call bytes the dry run and the planner count
    """

    bytes_sent: int = 0
    bytes_min: int = 0
    received_rows: int = 0
    total_bytes_sent: int = 0
    total_bytes_min: int = 0
    total_remote_pairs: int = 0
    total_tokens: int = 0
    total_call_bytes: int = 0
    comm_seconds: float = 0.0

    def record(self, sent: int, minimum: int, received_rows: int, remote_pairs: int = 0, tokens: int = 0) -> None:
        self.bytes_sent, self.bytes_min, self.received_rows = sent, minimum, received_rows
        self.total_bytes_sent += sent
        self.total_bytes_min += minimum
        self.total_remote_pairs += remote_pairs
        self.total_tokens += tokens

    def reset(self) -> None:
        self.total_bytes_sent = self.total_bytes_min = self.total_remote_pairs = self.total_tokens = 0
        self.total_call_bytes = 0
        self.comm_seconds = 0.0


@dataclass
class DispatchPlan:
    """Where one all-to-all dispatch sends every row and assignment (AllToAllDispatcher.plan)."""

    pair_token_P: torch.Tensor  # [P] token of each row sent, grouped by destination rank
    meta_A2: torch.Tensor  # [A, 2] per assignment sent: row within its destination's block, local expert
    weight_A: torch.Tensor  # [A] routing weight per assignment sent (differentiable)
    recv_counts: torch.Tensor  # [ep, 2] (rows, assignments) received from each rank, on the device
    send_rows: list[int]  # the same counts on the host: all_to_all_single's split sizes
    recv_rows: list[int]
    send_assign: list[int]
    recv_assign: list[int]


@dataclass
class _A2AHandle:
    pair_token_P: torch.Tensor
    send_rows: list[int]
    recv_rows: list[int]
    num_tokens: int


def _exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group, stats: DispatchStats | None):
    started = time.perf_counter()
    out = x.new_empty(sum(out_splits), *x.shape[1:])
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    if stats is not None:
        stats.comm_seconds += time.perf_counter() - started
        stats.total_call_bytes += max(x.numel(), out.numel()) * x.element_size()
    return out


class _AllToAll(torch.autograd.Function):
    """Uneven all-to-all of rows; the backward sends the gradients back the reverse way."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, stats):
        ctx.splits, ctx.group, ctx.stats = (out_splits, in_splits), group, stats
        return _exchange(x, out_splits, in_splits, group, stats)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _exchange(grad, in_splits, out_splits, ctx.group, ctx.stats), None, None, None, None


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group, stats=None) -> torch.Tensor:
    """Differentiable uneven all-to-all of rows (`all_to_all_single` both ways)."""
    return _AllToAll.apply(x, out_splits, in_splits, group, stats)


def _all_to_all_nograd(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group, stats=None):
    return _exchange(x, out_splits, in_splits, group, stats)


class AllToAllDispatcher:
    def __init__(self, num_experts: int, group: dist.ProcessGroup, *, dedup: bool = True) -> None:
        self.group = group
        self.ep = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if num_experts % self.ep:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by the EP size ({self.ep})")
        self.num_local = num_experts // self.ep
        self.dedup = dedup
        self.stats = DispatchStats()

    def plan(self, x_TD: torch.Tensor, routing: Routing) -> DispatchPlan:
        """Where every row and assignment goes (steps 1 and 3 of the module docstring, before any
        token moves). The one data-dependent part of the dispatcher: the split sizes are read
        back to the host here. The GPU dry run (sparse_train.parallel.balanced) replaces it with
        a balanced plan of the same form."""
        T = x_TD.shape[0]
        experts_A, token_A, weight_A, _ = sort_assignments(routing)  # sorted by expert, so by rank
        dest_A = experts_A // self.num_local
        # Rows to send: one per distinct (destination, token) with dedup, else one per assignment.
        key_A = dest_A * T + token_A
        order_A = torch.argsort(key_A, stable=True)
        key_A, experts_A, weight_A, dest_A = key_A[order_A], experts_A[order_A], weight_A[order_A], dest_A[order_A]
        pair_keys_P, pair_of_A = torch.unique_consecutive(key_A, return_inverse=True)
        if self.dedup:
            pair_token_P, pair_dest_P = pair_keys_P % T, pair_keys_P // T
        else:
            pair_of_A = torch.arange(key_A.numel(), device=key_A.device)
            pair_token_P, pair_dest_P = key_A % T, dest_A
        rows_per_dest = count_per_expert(pair_dest_P, self.ep)
        assignments_per_dest = count_per_expert(dest_A, self.ep)

        # counts: [ep, 2] (rows, assignments) to each destination
        send_counts = torch.stack([rows_per_dest, assignments_per_dest], dim=1)
        recv_counts = _all_to_all_nograd(send_counts, [1] * self.ep, [1] * self.ep, self.group, self.stats)
        send_rows, send_assign = rows_per_dest.tolist(), assignments_per_dest.tolist()
        recv_rows, recv_assign = recv_counts[:, 0].tolist(), recv_counts[:, 1].tolist()
        self._record_bytes(x_TD, send_rows, sum(recv_rows), dest_A, token_A[order_A])

        # per assignment: row within the sender's block, local expert
        first_row_of_dest = torch.cumsum(rows_per_dest, 0) - rows_per_dest
        meta_A2 = torch.stack([pair_of_A - first_row_of_dest[dest_A], experts_A - dest_A * self.num_local], dim=1)
        return DispatchPlan(
            pair_token_P, meta_A2, weight_A, recv_counts, send_rows, recv_rows, send_assign, recv_assign
        )

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> tuple[ExpertInput, _A2AHandle]:
        plan = self.plan(x_TD, routing)
        # token rows
        recv_x_RD = _all_to_all(
            permute(x_TD, plan.pair_token_P), plan.recv_rows, plan.send_rows, self.group, self.stats
        )
        # per assignment: (row, local expert), and the routing weight
        recv_meta = _all_to_all_nograd(plan.meta_A2, plan.recv_assign, plan.send_assign, self.group, self.stats)
        recv_weight = _all_to_all(plan.weight_A, plan.recv_assign, plan.send_assign, self.group, self.stats)
        source_of_assignment = torch.repeat_interleave(
            torch.arange(self.ep, device=x_TD.device), plan.recv_counts[:, 1], output_size=sum(plan.recv_assign)
        )
        first_recv_row = torch.cumsum(plan.recv_counts[:, 0], 0) - plan.recv_counts[:, 0]
        rows_recv = recv_meta[:, 0] + first_recv_row[source_of_assignment]
        local_expert = recv_meta[:, 1]
        by_expert = torch.argsort(local_expert, stable=True)
        expert_input = ExpertInput(
            recv_x_RD, rows_recv[by_expert], count_per_expert(local_expert, self.num_local), recv_weight[by_expert]
        )
        return expert_input, _A2AHandle(plan.pair_token_P, plan.send_rows, plan.recv_rows, x_TD.shape[0])

    def combine(self, y_RD: torch.Tensor, handle: _A2AHandle) -> torch.Tensor:
        back_PD = _all_to_all(y_RD, handle.send_rows, handle.recv_rows, self.group, self.stats)
        return unpermute(back_PD, handle.pair_token_P, None, handle.num_tokens)

    def _record_bytes(self, x, send_rows: list[int], received: int, dest_A, token_A) -> None:
        row_bytes = x.shape[1] * x.element_size()
        remote_rows = sum(send_rows) - send_rows[self.rank]
        # the minimum: distinct (token, remote rank) pairs, whatever `dedup` is
        remote = dest_A != self.rank
        distinct = torch.unique(dest_A[remote] * x.shape[0] + token_A[remote]).numel()
        self.stats.record(2 * remote_rows * row_bytes, 2 * distinct * row_bytes, received, distinct, x.shape[0])


@dataclass
class _AGHandle:
    num_tokens: int


class AllGatherDispatcher:
    """Gather all tokens of the EP group; each rank computes its experts' share; reduce-scatter."""

    def __init__(self, num_experts: int, group: dist.ProcessGroup) -> None:
        self.group = group
        self.ep = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if num_experts % self.ep:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by the EP size ({self.ep})")
        self.num_local = num_experts // self.ep
        self.stats = DispatchStats()

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> tuple[ExpertInput, _AGHandle]:
        T, k = routing.experts_Tk.shape
        all_x = funcol.all_gather_single_autograd(x_TD.contiguous(), gather_dim=0, group=self.group)
        all_w = funcol.all_gather_single_autograd(routing.weights_Tk.contiguous(), gather_dim=0, group=self.group)
        all_e = funcol.all_gather_single(routing.experts_Tk.contiguous(), gather_dim=0, group=self.group)
        active = routing.active_Tk
        kept = active if active is not None else torch.ones_like(routing.experts_Tk, dtype=torch.bool)
        all_kept = funcol.all_gather_single(kept.contiguous(), gather_dim=0, group=self.group)
        token_n, slot_n = self.local_assignments(funcol.wait_tensor(all_e), funcol.wait_tensor(all_kept))
        local_e = all_e[token_n, slot_n] - self.rank * self.num_local
        order = torch.argsort(local_e, stable=True)
        row_bytes = x_TD.shape[1] * x_TD.element_size()
        # gathered tokens from the others, and partial outputs to the others
        self.stats.record(2 * (self.ep - 1) * T * row_bytes, 0, int(token_n.numel()))
        expert_input = ExpertInput(
            all_x, token_n[order], count_per_expert(local_e, self.num_local), all_w[token_n, slot_n][order]
        )
        return expert_input, _AGHandle(T)

    def local_assignments(self, all_e: torch.Tensor, all_kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gathered token, slot) of every kept assignment this rank's experts serve. The one
        data-dependent part (how many there are is read back to the host); the GPU dry run
        (sparse_train.parallel.balanced) replaces it with a balanced selection of the same form."""
        local = all_kept & (all_e // self.num_local == self.rank)
        token_n, slot_n = torch.nonzero(local, as_tuple=True)
        return token_n, slot_n

    def combine(self, y_all: torch.Tensor, handle: _AGHandle) -> torch.Tensor:
        return funcol.reduce_scatter_single_autograd(y_all, "sum", scatter_dim=0, group=self.group)
