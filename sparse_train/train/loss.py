"""The training objective: next-token cross-entropy plus the sparse layers' auxiliary losses.

    loss = lm_loss + sum over sparse layers of the layer's weighted losses (SparseAux.objective)
    MoE:  aux_loss_coef * LBL + z_loss_coef * z            (router.*)
    FFF:  balance_coef * leaf LBL + hardening_coef * H     (fff.*)

    MTP:  mtp_loss_coef * mean over the multi-token prediction modules of their cross-entropy

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


def mtp_loss(output: ModelOutput, targets_BS: torch.Tensor) -> torch.Tensor:
    """Mean over the multi-token prediction modules of their cross-entropy: module k's logits at
    position i predict targets[i + k] (the token k + 1 places after input i)."""
    losses = [lm_loss(logits, targets_BS[:, k:]) for k, logits in enumerate(output.mtp_logits, start=1)]
    return torch.stack(losses).mean()


def total_loss(
    output: ModelOutput, targets_BS: torch.Tensor, names: tuple[str, ...], mtp_coef: float = 0.0
) -> LossParts:
    """lm_loss + the sparse layers' objectives (+ mtp_coef * mtp_loss, logged as `mtp_loss`,
    when the model has multi-token prediction modules)."""
    lm = lm_loss(output.logits_BSV, targets_BS)
    layers = output.sparse_aux
    loss, aux = lm, {name: lm.new_zeros(()) for name in names}
    if layers:
        loss = lm + torch.stack([a.objective for a in layers]).sum()
        aux = {name: torch.stack([a.losses[name] for a in layers]).mean() for name in names}
    if output.mtp_logits:
        aux["mtp_loss"] = mtp_loss(output, targets_BS)
        loss = loss + mtp_coef * aux["mtp_loss"]
    return LossParts(loss, lm, aux)
