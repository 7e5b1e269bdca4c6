"""Causal self-attention of a block: grouped-query attention (Llama, Qwen3, OLMoE, gpt-oss) or
multi-head latent attention (DeepSeek-V2/V3), chosen by model.attention.kind.

Single-device code. Head counts are read from the projections' outputs, never from the config,
so under tensor parallelism (sparse_train.parallel.tensor) the same code runs on the rank's
n_heads / tp heads. The places where a rank's heads are not self-contained take their
cross-rank step through a seam the parallelizer sets (`QKNorm.weight_in`, `QKNorm.sum_shards`,
`LatentAttention.rope_key_in`): identity on one device.

Shape legend: B batch, S sequence, D model width, H (local) heads, Hkv key/value heads,
Dh head width, Dq query/key head width, Dv value head width, R latent rank.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sparse_train.config import ModelConfig
from sparse_train.models.experts import local_shard
from sparse_train.models.rope import apply_rotary, mla_softmax_scale

LATENT_NORM_EPS = 1e-6  # DeepSeek-V3's q/kv latent norms use this fixed epsilon (not model.norm_eps)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


class QKNorm(nn.Module):
    """RMSNorm of queries or keys: per head over Dh (Qwen3) or over the whole projection (OLMoE).

    Under tensor parallelism a rank holds some of the heads. Per head, the weight [Dh] is shared
    by every head, so its gradient is the sum over the ranks' heads (`weight_in`: identity
    forward, all-reduce backward). Over the projection, the mean square needs every head's
    values (`sum_shards`: a differentiable sum over the ranks) and the weight [H * Dh] is
    sharded with the heads."""

    def __init__(self, width: int, eps: float, head_dim: int | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps, self.head_dim, self.full_width = eps, head_dim, width
        self.weight_in: Callable[[torch.Tensor], torch.Tensor] = _identity
        self.sum_shards: Callable[[torch.Tensor], torch.Tensor] = _identity

    def forward(self, x_BSW: torch.Tensor) -> torch.Tensor:
        """x: one projection's output [B, S, H * Dh], normalised in fp32 as HF does."""
        weight = self.weight_in(local_shard(self.weight))
        x = x_BSW.float()
        if self.head_dim is not None:
            x = x.unflatten(-1, (-1, self.head_dim))
            normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
            return (weight * normed.to(x_BSW.dtype)).flatten(-2)
        mean_square = self.sum_shards(x.pow(2).sum(-1, keepdim=True)) / self.full_width
        return weight * (x * torch.rsqrt(mean_square + self.eps)).to(x_BSW.dtype)


def attend(
    q_BHSD: torch.Tensor,
    k_BHSD: torch.Tensor,
    v_BHSDv: torch.Tensor,
    scale: float,
    window: int | None = None,
    sinks_H: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal softmax attention, optionally within a sliding window (each query sees itself and
    the window - 1 positions before it) and with per-head sink logits (a softmax column that
    attends to nothing: gpt-oss). Plain causal attention goes to SDPA; the other two build the
    [S, S] scores (fine at the lengths trained here; a GPU run at long context wants flex
    attention for them)."""
    if window is None and sinks_H is None:
        return F.scaled_dot_product_attention(q_BHSD, k_BHSD, v_BHSDv, is_causal=True, scale=scale)
    S = q_BHSD.shape[2]
    pos = torch.arange(S, device=q_BHSD.device)
    visible_SS = pos[None, :] <= pos[:, None]
    if window is not None:
        visible_SS &= pos[None, :] > pos[:, None] - window
    if sinks_H is None:
        return F.scaled_dot_product_attention(q_BHSD, k_BHSD, v_BHSDv, attn_mask=visible_SS, scale=scale)
    scores_BHSS = (q_BHSD @ k_BHSD.transpose(-1, -2)) * scale
    scores_BHSS = scores_BHSS.masked_fill(~visible_SS, float("-inf"))
    sink_BHS1 = sinks_H.to(scores_BHSS.dtype).view(1, -1, 1, 1).expand(*scores_BHSS.shape[:-1], 1)
    probs = torch.softmax(torch.cat([scores_BHSS, sink_BHS1], dim=-1), dim=-1)[..., :-1]
    return probs.to(v_BHSDv.dtype) @ v_BHSDv


class Attention(nn.Module):
    """Grouped-query attention: q/k/v projections (optional biases), optional q/k RMSNorm,
    rotary embedding, causal (optionally sliding-window, optionally sink) softmax, output
    projection (optional bias)."""

    def __init__(self, m: ModelConfig, layer: int) -> None:
        super().__init__()
        a = m.attention
        n_kv_heads = m.n_kv_heads or m.n_heads
        self.head_dim, self.window, self.interleaved = m.head_dim, m.sliding_window(layer), a.rope_interleave
        self.scale = self.head_dim**-0.5
        self.wq = nn.Linear(m.d_model, m.n_heads * self.head_dim, bias=m.qkv_bias)
        self.wk = nn.Linear(m.d_model, n_kv_heads * self.head_dim, bias=m.qkv_bias)
        self.wv = nn.Linear(m.d_model, n_kv_heads * self.head_dim, bias=m.qkv_bias)
        self.wo = nn.Linear(m.n_heads * self.head_dim, m.d_model, bias=a.out_bias)
        self.q_norm = self.k_norm = None
        if a.qk_norm != "none":
            per_head = self.head_dim if a.qk_norm == "head" else None
            self.q_norm = QKNorm(per_head or m.n_heads * self.head_dim, m.norm_eps, per_head)
            self.k_norm = QKNorm(per_head or n_kv_heads * self.head_dim, m.norm_eps, per_head)
        self.sinks = nn.Parameter(torch.zeros(m.n_heads)) if a.sinks else None  # [H] sink logit per head

    def forward(self, x_BSD: torch.Tensor, cos_SDh: torch.Tensor, sin_SDh: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q, k, v = self.wq(x_BSD), self.wk(x_BSD), self.wv(x_BSD)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(B, S, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q = apply_rotary(q, cos_SDh, sin_SDh, self.interleaved)
        k = apply_rotary(k, cos_SDh, sin_SDh, self.interleaved)
        if k.shape[1] != q.shape[1]:
            repeat = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        sinks = None if self.sinks is None else local_shard(self.sinks)
        out_BHSDh = attend(q, k, v, self.scale, self.window, sinks)
        return self.wo(out_BHSDh.transpose(1, 2).reshape(B, S, -1))


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3).

    Queries: x -> q_down (rank R_q) -> RMSNorm -> q_up, or one projection wq without
    q_lora_rank. Keys and values: x -> kv_down -> [latent c (rank R_kv), shared rotary key],
    c -> RMSNorm -> kv_up -> per-head [non-rotary key, value]. Each head's query/key is its
    non-rotary part followed by the rotary part; the rotary key is one for all heads."""

    def __init__(self, m: ModelConfig, layer: int) -> None:
        super().__init__()
        a = m.attention
        H = m.n_heads
        self.nope, self.rope, self.v_dim = a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
        self.rank = a.kv_lora_rank
        qk_head = self.nope + self.rope
        self.interleaved, self.scale = a.rope_interleave, mla_softmax_scale(m)  # YaRN-aware
        self.wq = self.q_down = self.q_norm = self.q_up = None
        if a.q_lora_rank is None:
            self.wq = nn.Linear(m.d_model, H * qk_head, bias=False)
        else:
            self.q_down = nn.Linear(m.d_model, a.q_lora_rank, bias=False)
            self.q_norm = nn.RMSNorm(a.q_lora_rank, eps=LATENT_NORM_EPS)
            self.q_up = nn.Linear(a.q_lora_rank, H * qk_head, bias=False)
        self.kv_down = nn.Linear(m.d_model, self.rank + self.rope, bias=False)
        self.kv_norm = nn.RMSNorm(self.rank, eps=LATENT_NORM_EPS)
        self.kv_up = nn.Linear(self.rank, H * (self.nope + self.v_dim), bias=False)
        self.wo = nn.Linear(H * self.v_dim, m.d_model, bias=a.out_bias)
        # Under tensor parallelism the shared rotary key feeds every rank's heads without passing
        # a column-parallel projection: its gradient is summed over the ranks here (identity on one device)
        self.rope_key_in: Callable[[torch.Tensor], torch.Tensor] = _identity

    def forward(self, x_BSD: torch.Tensor, cos_SDh: torch.Tensor, sin_SDh: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q = self.wq(x_BSD) if self.wq is not None else self.q_up(self.q_norm(self.q_down(x_BSD)))
        q_nope, q_rot = q.view(B, S, -1, self.nope + self.rope).transpose(1, 2).split([self.nope, self.rope], -1)
        latent, k_rot = self.kv_down(x_BSD).split([self.rank, self.rope], dim=-1)
        kv = self.kv_up(self.kv_norm(latent)).view(B, S, -1, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        q_rot = apply_rotary(q_rot, cos_SDh, sin_SDh, self.interleaved)
        k_rot = apply_rotary(self.rope_key_in(k_rot).view(B, 1, S, self.rope), cos_SDh, sin_SDh, self.interleaved)
        q = torch.cat([q_nope, q_rot], dim=-1)
        k = torch.cat([k_nope, k_rot.expand(-1, k_nope.shape[1], -1, -1)], dim=-1)
        out_BHSDv = attend(q, k, v, self.scale)
        return self.wo(out_BHSDv.transpose(1, 2).reshape(B, S, -1))


def build_attention(m: ModelConfig, layer: int) -> nn.Module:
    return LatentAttention(m, layer) if m.attention.kind == "mla" else Attention(m, layer)
