"""The training objective: next-token cross-entropy plus the routers' auxiliary losses.

    loss = lm_loss + aux_loss_coef * sum_layers(LBL) + z_loss_coef * sum_layers(z)

The coefficients apply per MoE layer, as in Megatron-Core and Switch. The logged `aux_loss`
and `z_loss` are means over MoE layers, so an evenly balanced model logs aux_loss ~= 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparse_train.config import RouterConfig
from sparse_train.models.transformer import ModelOutput


@dataclass
class LossParts:
    loss: torch.Tensor
    lm_loss: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor


def lm_loss(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_BSV.float().flatten(0, 1), targets_BS.flatten())


def total_loss(output: ModelOutput, targets_BS: torch.Tensor, router: RouterConfig) -> LossParts:
    lm = lm_loss(output.logits_BSV, targets_BS)
    if not output.moe_aux:
        zero = lm.new_zeros(())
        return LossParts(lm, lm, zero, zero)
    lb_sum = torch.stack([a.lb_loss for a in output.moe_aux]).sum()
    z_sum = torch.stack([a.z_loss for a in output.moe_aux]).sum()
    loss = lm + router.aux_loss_coef * lb_sum + router.z_loss_coef * z_sum
    n = len(output.moe_aux)
    return LossParts(loss, lm, lb_sum / n, z_sum / n)
