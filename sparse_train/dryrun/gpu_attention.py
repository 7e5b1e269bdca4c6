"""Attention as a GPU runs it, for a dry run on fake CUDA tensors.

`F.scaled_dot_product_attention` picks its kernel through a CUDA dispatch stub that a CPU build
of torch does not have, so on fake CUDA tensors it falls back to the math path: an [S, S] score
matrix per head, in fp32, kept for the backward. A GPU runs FlashAttention (equal query and value
head widths up to 256, no mask) or the memory-efficient kernel (the rest); neither keeps the
scores. `patched()` makes the dry run call those kernels' own operators, whose fake (meta)
implementations, autograd formulas and FLOP formulas torch has, so its memory and FLOPs are the
GPU's. Autocast casts the inputs as it does for SDPA on CUDA.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F

FLASH_MAX_HEAD_DIM = 256


@contextmanager
def patched() -> Iterator[None]:
    original = F.scaled_dot_product_attention

    def attention(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if query.device.type != "cuda" or kwargs.get("enable_gqa"):
            return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **kwargs)
        if torch.is_autocast_enabled("cuda"):
            dtype = torch.get_autocast_dtype("cuda")
            query, key, value = (t.to(dtype) for t in (query, key, value))
        flash = attn_mask is None and query.size(-1) == value.size(-1) <= FLASH_MAX_HEAD_DIM
        if flash:
            return torch.ops.aten._scaled_dot_product_flash_attention(
                query, key, value, dropout_p, is_causal, False, scale=scale
            )[0]
        if attn_mask is not None and attn_mask.dtype == torch.bool:  # the kernel takes an additive bias
            attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~attn_mask, float("-inf")
            )
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, attn_mask, query.requires_grad, dropout_p, is_causal, scale=scale
        )[0]

    with mock.patch.object(F, "scaled_dot_product_attention", attention):
        yield
