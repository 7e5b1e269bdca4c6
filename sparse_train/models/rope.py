"""Rotary position embeddings: the cos/sin tables and their application to queries and keys.

Two layouts of the rotated pairs: Llama's (dimension i pairs with i + Dh/2, "half-split") and
DeepSeek's interleaved one (2i pairs with 2i + 1), which Hugging Face's DeepSeek-V3 uses when
`rope_interleave` is set. The tables are the half-split ones; the interleaved layout is
rotated by viewing the pairs in half-split order and back.

Shape legend: B batch, H heads, S sequence, Dh rotated width.
"""

from __future__ import annotations

import torch

from sparse_train.config import ModelConfig


def rotary_tables(m: ModelConfig, max_seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [S, Dh] (fp32) for the rotated width of model `m` (ModelConfig.rope_dim)."""
    dim, length = m.rope_dim, max_seq_len or m.max_seq_len
    inv_freq = 1.0 / (m.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angles_SF = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)
    angles_SDh = torch.cat([angles_SF, angles_SF], dim=-1)
    return angles_SDh.cos().float(), angles_SDh.sin().float()


def apply_rotary(
    x_BHSDh: torch.Tensor, cos_SDh: torch.Tensor, sin_SDh: torch.Tensor, interleaved: bool = False
) -> torch.Tensor:
    if interleaved:  # pairs (2i, 2i+1) -> (i, i + Dh/2): rotate in half-split order, then back
        *lead, width = x_BHSDh.shape
        halves = x_BHSDh.unflatten(-1, (width // 2, 2)).transpose(-1, -2).reshape(*lead, width)
        rotated = apply_rotary(halves, cos_SDh, sin_SDh)
        return rotated.unflatten(-1, (2, width // 2)).transpose(-1, -2).reshape(*lead, width)
    half = x_BHSDh.shape[-1] // 2
    rotated = torch.cat([-x_BHSDh[..., half:], x_BHSDh[..., :half]], dim=-1)
    return (x_BHSDh * cos_SDh + rotated * sin_SDh).to(x_BHSDh.dtype)
