"""Router losses, computed from `Routing.stats` and returned by the layer (never kept in globals).

Load-balancing loss (Switch / GShard):  LBL = N_E * sum_i f_i * p_i
    f_i  fraction of routed assignments that chose expert i (counts, no gradient)
    p_i  mean router probability of expert i (carries the gradient)
It equals 1 for a perfectly uniform router and grows as load concentrates.

`balance_scope` says over which tokens f_i and p_i are taken:
    micro_batch   all tokens of the micro-batch on this rank
    sequence      each sequence separately, then averaged (DeepSeek's sequence-wise loss)
    global_batch  f_i over the whole optimizer step so far: every data-parallel rank's tokens and
                  the step's earlier accumulation micro-batches ("Demons in the Detail"); p_i
                  stays this micro-batch's own, so gradients stay local
The counts pass through a `CountSync` before f_i is formed: the identity for micro_batch, a
`GlobalBatchCounts` for global_batch (docs/decisions.md, decision 16).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sparse_train.kernels import count_per_expert

CountSync = Callable[[torch.Tensor], torch.Tensor]


def local_counts(counts_E: torch.Tensor) -> torch.Tensor:
    """The micro_batch CountSync: the counts of this micro-batch as they are."""
    return counts_E


class GlobalBatchCounts:
    """The global_batch CountSync: counts summed over the step's micro-batches so far, and over
    data-parallel ranks.

    Micro-batch j of an optimizer step forms f_i from the counts of micro-batches 1..j (later
    micro-batches do not exist yet when j's loss is formed), as Megatron's global_aux_loss does.
    `reset()` starts a new step. Summing over ranks is the parallel layer's business: it sets
    `reduce_across_ranks` (parallel/expert.py); in model code it is the identity, so model code
    never calls torch.distributed.
    """

    def __init__(self, reduce_across_ranks: CountSync = local_counts) -> None:
        self.reduce_across_ranks = reduce_across_ranks
        self.running_E: torch.Tensor | None = None

    def __call__(self, counts_E: torch.Tensor) -> torch.Tensor:
        counts_E = self.reduce_across_ranks(counts_E.detach().clone())
        self.running_E = counts_E if self.running_E is None else self.running_E + counts_E
        return self.running_E

    def reset(self) -> None:
        self.running_E = None


def expert_counts(experts_Tk: torch.Tensor, num_experts: int, selected_Tk: torch.Tensor | None = None) -> torch.Tensor:
    """Assignments per expert, as fp32 `[E]` (before any capacity drop); only the `selected_Tk`
    slots where a router selects a variable number of experts (Routing.selected_Tk)."""
    if selected_Tk is None:
        return count_per_expert(experts_Tk, num_experts).float()
    counts_E = torch.zeros(num_experts, device=experts_Tk.device)
    return counts_E.index_add_(0, experts_Tk.reshape(-1), selected_Tk.reshape(-1).float())


def load_balancing_loss(
    probs_TE: torch.Tensor,
    experts_Tk: torch.Tensor,
    *,
    scope: str = "micro_batch",
    seq_len: int | None = None,
    count_sync: CountSync = local_counts,
    selected_Tk: torch.Tensor | None = None,
) -> torch.Tensor:
    """N_E * sum_i f_i p_i over the tokens `scope` names; fp32 scalar. `selected_Tk`: the slots
    holding an assignment, where the router selects a variable number (None: every slot)."""
    num_experts = probs_TE.shape[-1]
    if scope in ("micro_batch", "global_batch"):  # they differ only in the CountSync
        counts_E = count_sync(expert_counts(experts_Tk, num_experts, selected_Tk))
        f_E = counts_E / counts_E.sum().clamp_min(1.0)
        p_E = probs_TE.float().mean(dim=0)
        return num_experts * torch.dot(f_E, p_E)
    if scope == "sequence":
        if seq_len is None or probs_TE.shape[0] % seq_len != 0:
            raise ValueError(f"sequence-scope balancing needs T ({probs_TE.shape[0]}) divisible by seq_len ({seq_len})")
        B = probs_TE.shape[0] // seq_len
        experts_BA = experts_Tk.reshape(B, -1)
        counts_BE = torch.zeros(B, num_experts, device=probs_TE.device)
        ones_BA = torch.ones_like(experts_BA, dtype=counts_BE.dtype)
        counts_BE.scatter_add_(1, experts_BA, ones_BA if selected_Tk is None else selected_Tk.reshape(B, -1).float())
        f_BE = counts_BE / counts_BE.sum(dim=-1, keepdim=True).clamp_min(1.0)
        p_BE = probs_TE.float().reshape(B, seq_len, num_experts).mean(dim=1)
        return num_experts * (f_BE * p_BE).sum(dim=-1).mean()
    raise ValueError(f"unknown balance scope {scope!r}; allowed: micro_batch, sequence, global_batch")


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2; keeps router logits small."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def router_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the routing distribution per token; a metric, no gradient."""
    p = probs_TE.detach().float()
    return -(p * torch.log(p.clamp_min(1e-20))).sum(dim=-1).mean()
