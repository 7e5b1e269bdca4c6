"""Multi-token prediction (DeepSeek-V3): module k predicts the token k+1 places after each
position, from the previous depth's hidden state and the embedding of the token k places on.

    h'_k[i] = proj([enorm(embed(t[i + k])); hnorm(h_{k-1}[i])])      (h_0: the last block's output)
    h_k     = block_k(h'_k)                                            (a transformer block of its own)
    logits_k[i] = lm_head(norm_k(h_k[i]))  ->  t[i + k + 1]           (the model's embedding and head)

A sequence of S tokens gives module k S - k positions. The modules train the main model
through h_0 (a denser signal per token) and may serve speculative decoding; the loss weight
is model.mtp_loss_coef (DeepSeek-V3: 0.3, then 0.1), applied to the mean over the modules.

Shape legend: B batch, S sequence, D model width.
"""

from __future__ import annotations

import torch
from torch import nn

from sparse_train.config import ModelConfig
from sparse_train.models.sparse import SparseAux


class MTPModule(nn.Module):
    def __init__(self, m: ModelConfig, block: nn.Module) -> None:
        super().__init__()
        self.enorm = nn.RMSNorm(m.d_model, eps=m.norm_eps)
        self.hnorm = nn.RMSNorm(m.d_model, eps=m.norm_eps)
        self.proj = nn.Linear(2 * m.d_model, m.d_model, bias=False)
        self.block = block
        self.norm = nn.RMSNorm(m.d_model, eps=m.norm_eps)

    def forward(
        self,
        previous_BSD: torch.Tensor,
        embedded_BSD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        carry: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, SparseAux | None]:
        """The module's hidden state (for the next module), the same normed (for the output head),
        and its sparse layer's aux, if any. The norm is applied here, inside the module's own
        forward, where a data-parallel wrapper (FSDP) has gathered its parameters."""
        x_BSD = self.proj(torch.cat([self.enorm(embedded_BSD), self.hnorm(previous_BSD)], dim=-1))
        h_BSD, aux = self.block(x_BSD, cos, sin, carry)
        return h_BSD, self.norm(h_BSD), aux
