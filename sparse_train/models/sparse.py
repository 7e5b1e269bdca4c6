"""What the two sparse FFN layers (MoE, FFF) share, so the rest of the system treats them alike.

Both are `SparseFFN`s: a router picks experts (MoE) or leaves (FFF) per token, a swappable
`dispatcher` moves tokens to them, stacked `experts` compute, a swappable `count_sync` forms
the balancing loss's counts. The parallel layer (sharding experts and leaves over EP ranks),
the trainer's loss and metrics, and pipeline stages only use this interface.

Each forward returns `(y, SparseAux)`:
    objective  the coefficient-weighted sum of the layer's losses, added to the training loss
    losses     the unweighted losses by name (logged as means over sparse layers)
    load       [E] share of routed assignments per expert / leaf (no gradient)
    metrics    per-layer scalars for logging (no gradient)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from sparse_train.models.dispatch import LocalDispatcher
from sparse_train.models.losses import CountSync, GlobalBatchCounts, local_counts


@dataclass
class SparseAux:
    kind: str  # "moe" | "fff": the metrics prefix
    objective: torch.Tensor
    losses: dict[str, torch.Tensor]
    load: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    # what the next sparse layer reads (MoE++ gating residual: this layer's router logits [T, E])
    carry: torch.Tensor | None = None

    def detached(self) -> SparseAux:
        return replace(
            self,
            carry=None,
            objective=self.objective.detach(),
            losses={k: v.detach() for k, v in self.losses.items()},
            load=self.load.detach(),
            metrics={k: v.detach() for k, v in self.metrics.items()},
        )


# Names of the losses each kind of sparse layer reports, in logging order.
LOSS_NAMES = {"moe": ("aux_loss", "z_loss"), "fff": ("aux_loss", "hardening_loss")}
# Name of the load vector in metrics, per kind.
LOAD_NAMES = {"moe": "expert_load", "fff": "leaf_usage"}


class SparseFFN(nn.Module):
    """Base of MoELayer and FFFLayer: the seams the parallel layer swaps from outside."""

    kind: str
    num_experts: int  # routed experts (MoE) or leaves (FFF): what EP shards
    experts: nn.Module

    def _init_seams(self, num_experts: int, balance_scope: str) -> None:
        self.num_experts = num_experts
        self.balance_scope = balance_scope
        # Swappable from outside by the parallel layer (never set inside model code):
        self.dispatcher = LocalDispatcher(num_experts)
        self.count_sync: CountSync = GlobalBatchCounts() if balance_scope == "global_batch" else local_counts
