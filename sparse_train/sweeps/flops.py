"""Parameters and training FLOPs of a sweep point, from its resolved config.

    N_total   every parameter of the built model
    N_active  the parameters one token uses (top_k of the routed experts, one FFF leaf),
              without the input embedding (a lookup, no FLOPs)
    D         training tokens = train.steps x train.batch_size x train.grad_accum x data.seq_len
    C         6 N_active D + 6 L S d D

6 N D is Kaplan et al. (2020)'s forward + backward cost of the weight matmuls (2 FLOPs per
multiply-add, x3 for the backward); 6 L S d D adds the attention scores and their weighted
sum (2 L S d per token forward, causal masking ignored as Kaplan do). The model is built on
the meta device, so counting costs no memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparse_train.config import Config
from sparse_train.models.transformer import Transformer, count_parameters
from sparse_train.train.trainer import resolve_config

BYTE_VOCAB = 258  # the byte tokenizer's; sweeps on the default corpus use it


@dataclass(frozen=True)
class Compute:
    params_total: int
    params_active: int  # without the input embedding
    tokens: int
    flops: float

    def as_dict(self) -> dict[str, float]:
        return {
            "params_total": self.params_total,
            "params_active": self.params_active,
            "tokens": self.tokens,
            "flops": self.flops,
        }


def compute_of(cfg: Config) -> Compute:
    if cfg.model.vocab_size is None:
        cfg = resolve_config(cfg, BYTE_VOCAB)
    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.moe, cfg.router, cfg.fff)
    counts = count_parameters(model)
    active = counts["active"] - model.embed.weight.numel() * (not cfg.model.tie_embeddings)
    t, m = cfg.train, cfg.model
    tokens = t.steps * t.batch_size * t.grad_accum * cfg.data.seq_len
    flops = 6.0 * active * tokens + 6.0 * m.n_layers * cfg.data.seq_len * m.d_model * tokens
    return Compute(counts["total"], active, tokens, flops)
