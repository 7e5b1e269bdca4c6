"""The training objective: next-token cross-entropy plus the sparse layers' auxiliary losses.

    loss = lm_loss + sum over sparse layers of the layer's weighted losses (SparseAux.objective)
    MoE:  aux_loss_coef * LBL + z_loss_coef * z            (router.*)
    FFF:  balance_coef * leaf LBL + hardening_coef * H     (fff.*)

The coefficients apply per layer, as in Megatron-Core and Switch. The logged auxiliary losses
(`aux_loss` and `z_loss`, or `aux_loss` and `hardening_loss`) are unweighted means over the
sparse layers, so an evenly balanced model logs aux_loss ~= 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sparse_train.config import Config
from sparse_train.models.sparse import LOSS_NAMES
from sparse_train.models.transformer import ModelOutput


def aux_loss_names(cfg: Config) -> tuple[str, ...]:
    """The auxiliary losses a model of this config logs (a dense model logs the MoE names as zeros)."""
    return LOSS_NAMES.get(cfg.model.ffn, LOSS_NAMES["moe"])


@dataclass
class LossParts:
    loss: torch.Tensor
    lm_loss: torch.Tensor
    aux: dict[str, torch.Tensor] = field(default_factory=dict)  # unweighted, means over sparse layers

    def values(self) -> dict[str, torch.Tensor]:
        return {"loss": self.loss, "lm_loss": self.lm_loss, **self.aux}


def lm_loss(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_BSV.float().flatten(0, 1), targets_BS.flatten())


def total_loss(output: ModelOutput, targets_BS: torch.Tensor, names: tuple[str, ...]) -> LossParts:
    lm = lm_loss(output.logits_BSV, targets_BS)
    layers = output.sparse_aux
    if not layers:
        return LossParts(lm, lm, {name: lm.new_zeros(()) for name in names})
    loss = lm + torch.stack([a.objective for a in layers]).sum()
    aux = {name: torch.stack([a.losses[name] for a in layers]).mean() for name in names}
    return LossParts(loss, lm, aux)
