"""Rotary position embeddings: the cos/sin tables, their application to queries and keys, and
YaRN context extension (DeepSeek-V3, gpt-oss) as Hugging Face transformers computes it.

Two layouts of the rotated pairs: Llama's (dimension i pairs with i + Dh/2, "half-split") and
DeepSeek's interleaved one (2i pairs with 2i + 1), which Hugging Face's DeepSeek-V3 uses when
`rope_interleave` is set. The tables are the half-split ones; the interleaved layout is
rotated by viewing the pairs in half-split order and back.

YaRN (Peng et al., 2023, arXiv:2309.00071) keeps the fast frequencies (many rotations over the
pre-training context: extrapolated), divides the slow ones by `factor` (interpolated), blends
linearly between, and scales cos/sin by an attention factor. The tables must match the ones a
checkpoint was trained with to the last bit we can get, hence float64 and HF's exact quirks.

Shape legend: B batch, H heads, S sequence, Dh rotated width, F = Dh/2 frequencies.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from sparse_train.config import ModelConfig, RopeScalingConfig

__all__ = [
    "apply_rotary",
    "mla_softmax_scale",
    "rope_fields_from_hf",
    "rope_frequencies",
    "rope_parameters_to_hf",
    "rotary_tables",
    "yarn_mscale",
]

# HF's defaults for YaRN keys a config leaves out (or sets to 0/null: it tests truthiness).
_BETA_FAST, _BETA_SLOW = 32.0, 1.0


def yarn_mscale(factor: float, coef: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 coef ln(factor) + 1: longer contexts flatten the softmax,
    so logits (via cos/sin, or MLA's softmax scale) are sharpened back; 1 without extension."""
    return 1.0 if factor <= 1 else 0.1 * coef * math.log(factor) + 1.0


def _yarn_attention_factor(r: RopeScalingConfig) -> float:
    """The cos/sin scale: given, or DeepSeek's mscale(factor, mscale) / mscale(factor, mscale_all_dim)
    when both are set (non-zero, as HF tests them), or mscale(factor)."""
    if r.attention_factor is not None:
        return float(r.attention_factor)
    if r.mscale and r.mscale_all_dim:
        return yarn_mscale(r.factor, r.mscale) / yarn_mscale(r.factor, r.mscale_all_dim)
    return yarn_mscale(r.factor)


def _correction_index(rotations: float, dim: int, theta: float, context: int) -> float:
    """The (fractional) frequency index i whose wave turns `rotations` times over `context`
    positions: context / (2 pi theta^(2i/dim)) = rotations, solved for i."""
    return dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(theta))


def rope_frequencies(m: ModelConfig) -> tuple[torch.Tensor, float]:
    """inv_freq [F] (float64) and the scale of cos/sin for model `m`: the base frequencies
    theta^(-2i/Dh), or, with rope_scaling.kind == "yarn", YaRN's blend of them and their
    interpolation by `factor`."""
    dim, theta, r = m.rope_dim, m.rope_theta, m.rope_scaling
    base_F = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    if r.kind == "none":
        return base_F, 1.0
    if r.original_max_seq_len is None:  # validation guarantees it; this keeps the type checker honest
        raise ValueError("yarn rope scaling needs model.rope_scaling.original_max_seq_len")
    # The ramp runs over frequency indices 0..F-1, but, as in HF (and the YaRN reference code), the
    # correction range is clamped to [0, Dh - 1] (not F - 1): a high end past F - 1 is kept and
    # flattens the ramp. Truncation widens the range to whole indices first (DeepSeek-V3: yes,
    # gpt-oss: no).
    low = _correction_index(r.beta_fast or _BETA_FAST, dim, theta, r.original_max_seq_len)
    high = _correction_index(r.beta_slow or _BETA_SLOW, dim, theta, r.original_max_seq_len)
    if r.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:  # a step instead of a ramp: HF widens it by 0.001 to avoid dividing by zero
        high += 0.001
    index_F = torch.arange(dim // 2, dtype=torch.float64)
    interpolated_F = ((index_F - low) / (high - low)).clamp(0.0, 1.0)  # 0 below low: kept, 1 above high: / factor
    inv_freq_F = base_F * (1 - interpolated_F) + (base_F / r.factor) * interpolated_F
    return inv_freq_F, _yarn_attention_factor(r)


def rotary_tables(m: ModelConfig, max_seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [S, Dh] (fp32) for the rotated width of model `m` (ModelConfig.rope_dim), with
    YaRN when model.rope_scaling says so. Computed in float64: fp32 angles lose ~1e-4 at
    position 4096."""
    inv_freq_F, scale = rope_frequencies(m)
    angles_SF = torch.outer(torch.arange(max_seq_len or m.max_seq_len, dtype=torch.float64), inv_freq_F)
    angles_SDh = torch.cat([angles_SF, angles_SF], dim=-1)
    return (angles_SDh.cos() * scale).float(), (angles_SDh.sin() * scale).float()


def mla_softmax_scale(m: ModelConfig) -> float:
    """The softmax scale of multi-head latent attention: qk_head_dim^-0.5, times
    yarn_mscale(factor, mscale_all_dim)^2 with YaRN and a (non-zero) mscale_all_dim, as
    DeepSeek-V3 sharpens the logits of the whole head, not only its rotary part."""
    a = m.attention
    if a.kind != "mla":
        raise ValueError(f"mla_softmax_scale is multi-head latent attention's; model.attention.kind is {a.kind!r}")
    scale = (a.qk_nope_head_dim + a.qk_rope_head_dim) ** -0.5
    r = m.rope_scaling
    if r.kind == "yarn" and r.mscale_all_dim:
        scale *= yarn_mscale(r.factor, r.mscale_all_dim) ** 2
    return scale


def rope_fields_from_hf(hf_config: dict[str, Any]) -> dict[str, Any]:
    """The `model` section's rope fields (rope_theta, rope_scaling as RopeScalingConfig fields) of
    an HF config.json: transformers 5's `rope_parameters` or the older top-level `rope_theta` and
    `rope_scaling`. Follows HF's reading: a missing original_max_position_embeddings is
    max_position_embeddings (a top-level one wins, as for Phi-3), a missing factor is their ratio.
    Raises ValueError for rope types other than default and yarn."""
    params = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    if any(isinstance(value, dict) for value in params.values()):
        raise ValueError(f"per-layer-type rope parameters ({', '.join(params)}) are not supported")
    rope_type = params.get("rope_type") or params.get("type") or "default"
    theta = params.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    if params.get("partial_rotary_factor", hf_config.get("partial_rotary_factor", 1.0)) not in (None, 1, 1.0):
        raise ValueError("partial_rotary_factor != 1 is not supported (rotate the whole model.rope_dim)")
    scaling = RopeScalingConfig().to_dict()
    if rope_type == "default":
        return {"rope_theta": float(theta), "rope_scaling": scaling}
    if rope_type != "yarn":
        raise ValueError(f"rope type {rope_type!r} is not supported (only default and yarn)")
    max_positions = hf_config.get("max_position_embeddings")
    original = hf_config.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
    original = original or max_positions
    if original is None:
        raise ValueError("yarn rope needs original_max_position_embeddings or max_position_embeddings")
    factor = params.get("factor")
    if factor is None:
        if max_positions is None:
            raise ValueError("yarn rope without factor needs max_position_embeddings (factor = it / original)")
        factor = max_positions / original
    attention_factor = params.get("attention_factor")
    scaling.update(
        kind="yarn",
        factor=float(factor),
        original_max_seq_len=int(original),
        beta_fast=float(params.get("beta_fast") or _BETA_FAST),
        beta_slow=float(params.get("beta_slow") or _BETA_SLOW),
        attention_factor=None if attention_factor is None else float(attention_factor),
        mscale=_optional_float(params.get("mscale")),
        mscale_all_dim=_optional_float(params.get("mscale_all_dim")),
        truncate=bool(params.get("truncate", True)),
    )
    return {"rope_theta": float(theta), "rope_scaling": scaling}


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def rope_parameters_to_hf(m: ModelConfig) -> dict[str, Any]:
    """The `rope_parameters` of an HF config.json for which transformers builds our tables (and
    DeepSeek-V3 our softmax scale). Every YaRN field is explicit, so HF infers nothing from
    max_position_embeddings (which the caller writes, and may differ from model.max_seq_len)."""
    r = m.rope_scaling
    if r.kind == "none":
        return {"rope_type": "default", "rope_theta": float(m.rope_theta)}
    params: dict[str, Any] = {
        "rope_type": "yarn",
        "rope_theta": float(m.rope_theta),
        "factor": float(r.factor),
        "original_max_position_embeddings": r.original_max_seq_len,
        "beta_fast": float(r.beta_fast),
        "beta_slow": float(r.beta_slow),
        "truncate": r.truncate,
    }
    for key in ("attention_factor", "mscale", "mscale_all_dim"):
        if getattr(r, key) is not None:
            params[key] = float(getattr(r, key))
    return params


def apply_rotary(
    x_BHSDh: torch.Tensor, cos_SDh: torch.Tensor, sin_SDh: torch.Tensor, interleaved: bool = False
) -> torch.Tensor:
    """Rotate each pair of x by its position's angle (cos/sin carry YaRN's attention factor)."""
    if interleaved:  # pairs (2i, 2i+1) -> (i, i + Dh/2): rotate in half-split order, then back
        *lead, width = x_BHSDh.shape
        halves = x_BHSDh.unflatten(-1, (width // 2, 2)).transpose(-1, -2).reshape(*lead, width)
        rotated = apply_rotary(halves, cos_SDh, sin_SDh)
        return rotated.unflatten(-1, (2, width // 2)).transpose(-1, -2).reshape(*lead, width)
    half = x_BHSDh.shape[-1] // 2
    rotated = torch.cat([-x_BHSDh[..., half:], x_BHSDh[..., :half]], dim=-1)
    return (x_BHSDh * cos_SDh + rotated * sin_SDh).to(x_BHSDh.dtype)
