"""Triton kernels for expert compute: grouped GEMM (forward / dX via transposed w / dW) with
optional fused row gather and scatter (ScatterMoE's scatter2scatter), and the permute /
unpermute row moves. Imported only when triton is installed.

All offsets that multiply a row index are int64, so tensors past 2^31 elements are addressed
correctly. Accumulation is fp32 for every input dtype. Under the Triton interpreter
(TRITON_INTERPRET=1, which runs these kernels on CPU tensors) bf16/fp16 tiles are upcast to
fp32 before `tl.dot`, because the interpreter's low-precision dot is wrong, and kernels store
fp32 that torch then rounds to 16 bits, because the interpreter truncates fp32 -> bf16 instead
of rounding to nearest (measured: twice the rounding error; GPUs round correctly).

Rows are "sorted by group": group g owns rows [start_g, end_g) of the sorted row space. An
M-tile never straddles two groups; the tile schedule is computed on the device from `counts`
with an upper bound on the tile count, so launching needs no device-to-host sync.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import triton
import triton.language as tl

DEFAULT_BLOCK_M = 64


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _store_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel writes: fp32 for 16-bit outputs under the interpreter (see above)."""
    return torch.float32 if interpreting() and dtype in (torch.bfloat16, torch.float16) else dtype


def _flags(*tensors: torch.Tensor) -> dict[str, bool]:
    low_precision = any(t.dtype in (torch.bfloat16, torch.float16) for t in tensors)
    fp32_exact = all(t.dtype == torch.float32 for t in tensors) and not torch.backends.cuda.matmul.allow_tf32
    return {"UPCAST": interpreting() and low_precision, "FP32_IEEE": fp32_exact and not interpreting()}


# ---------------------------------------------------------------------------------------------
# grouped GEMM: C[c_row(m)] = A[a_row(m)] @ B[group(m)]   for sorted rows m
# ---------------------------------------------------------------------------------------------
@triton.jit
def _gmm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    a_rows_ptr,
    c_rows_ptr,
    tile_group_ptr,
    tile_row_ptr,
    group_end_ptr,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bg,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    GATHER_A: tl.constexpr,
    SCATTER_C: tl.constexpr,
    UPCAST: tl.constexpr,
    FP32_IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    group = tl.load(tile_group_ptr + pid_m)
    if group >= 0:  # tiles past the last group (the schedule is an upper bound) do nothing
        row0 = tl.load(tile_row_ptr + pid_m)
        row_end = tl.load(group_end_ptr + group)
        offs_m = row0 + tl.arange(0, BLOCK_M).to(tl.int64)
        mask_m = offs_m < row_end
        if GATHER_A:
            a_rows = tl.load(a_rows_ptr + offs_m, mask=mask_m, other=0)
        else:
            a_rows = offs_m
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        b_base = b_ptr + group.to(tl.int64) * stride_bg
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            a = tl.load(
                a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak,
                mask=mask_m[:, None] & mask_k[None, :],
                other=0.0,
            )
            b = tl.load(
                b_base + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                mask=mask_k[:, None] & mask_n[None, :],
                other=0.0,
            )
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if FP32_IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        if SCATTER_C:
            c_rows = tl.load(c_rows_ptr + offs_m, mask=mask_m, other=0)
        else:
            c_rows = offs_m
        tl.store(
            c_ptr + c_rows[:, None] * stride_cm + offs_n[None, :] * stride_cn,
            acc.to(c_ptr.dtype.element_ty),
            mask=mask_m[:, None] & mask_n[None, :],
        )


_GMM_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn, bk, w, s in [(128, 32, 4, 3), (64, 32, 4, 4), (128, 64, 8, 3), (64, 64, 4, 3)]
]
# AMD (ROCm): the same tiles in at most 2 stages. In 3, fp32 128x64 takes 96 KiB of LDS where a
# CDNA3 workgroup has 64 KiB (found by compiling for gfx942: sparse_train/kernels/aot.py); 2 is the
# HIP backend's default number of stages. Tiles and stages on AMD are otherwise unmeasured.
_GMM_CONFIGS_HIP = [
    triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=min(c.num_stages, 2)) for c in _GMM_CONFIGS
]
GMM_CONFIGS = {"cuda": _GMM_CONFIGS, "hip": _GMM_CONFIGS_HIP}  # by triton backend

# Configurations that spill registers on a target, for a dtype and flags, as compiled ahead of time
# (sparse_train/kernels/aot.py): one "grouped_gemm | configuration | dtype | target" a line, the AOT
# matrix's own case names. The autotuner never tries them there (_prune_spilling_gmm_configs); the
# full AOT test fails on a spill of any configuration not listed, and on a listed one that no longer
# spills or that the matrix does not have, so the file is exactly the set of spilling configurations.
SPILLING_CONFIGS_FILE = Path(__file__).with_name("spilling_configs.txt")
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@functools.cache
def spilling_gmm_configs() -> frozenset[str]:
    lines = SPILLING_CONFIGS_FILE.read_text().splitlines()
    return frozenset(line.strip() for line in lines if line.strip() and not line.startswith("#"))


def gmm_config_label(
    config: triton.Config,
    dtype: str,
    out_dtype: str,
    *,
    trans_w: bool,
    gather_a: bool,
    scatter_c: bool,
    fp32_ieee: bool,
) -> str:
    """An autotune configuration of the grouped GEMM with a launch's flags, as the AOT matrix and
    the spilling table name it: "autotune 128x32 w4 s3 gather_a fp32_ieee trans_w out fp32"."""
    on = [name for name, value in (("gather_a", gather_a), ("scatter_c", scatter_c), ("fp32_ieee", fp32_ieee)) if value]
    blocks = f"{config.kwargs['BLOCK_N']}x{config.kwargs['BLOCK_K']}"
    label = f"autotune {blocks} w{config.num_warps} s{config.num_stages} {' '.join(on) or 'plain'}"
    return label + " trans_w" * trans_w + f" out {out_dtype}" * (out_dtype != dtype)


def non_spilling_gmm_configs(
    configs: Iterable[triton.Config], target: str, dtype: str, out_dtype: str, **flags: bool
) -> list[triton.Config]:
    """`configs` without those listed as spilling on `target` (sm_80, gfx942, ...) for these
    dtypes and flags (trans_w, gather_a, scatter_c, fp32_ieee); may be empty (the tests check
    that no case of the AOT matrix leaves none)."""
    table = spilling_gmm_configs()
    return [
        c
        for c in configs
        if f"grouped_gemm | {gmm_config_label(c, dtype, out_dtype, **flags)} | {dtype} | {target}" not in table
    ]


@functools.cache
def _device_target(index: int) -> str:
    """The compile target of a GPU as the AOT matrix names it: sm_<major><minor> (Triton's CUDA
    arch, capability 8.0 -> sm_80, 12.1 -> sm_121), or the gfx architecture on ROCm."""
    if torch.version.hip:
        return torch.cuda.get_device_properties(index).gcnArchName.split(":")[0]
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm_{major}{minor}"


def running_target(device: torch.device) -> str:
    return _device_target(device.index if device.index is not None else torch.cuda.current_device())


def _prune_spilling_gmm_configs(
    configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any
) -> list[triton.Config]:
    """The autotuner's early_config_prune: Triton passes the positional arguments by name (the
    tensors, integers and strides) and the keyword ones (the constexpr flags). trans_w is w's K
    stride being 1, as in a launch with trans_w=True: Triton specialises a stride of 1 into the
    code, so that, not the launcher's argument, decides what compiles. Where every configuration
    would be pruned the list stays whole, with a warning (the AOT tests fail on such a table)."""
    a, c = named_args["a_ptr"], named_args["c_ptr"]
    dtype, out_dtype = DTYPE_NAMES.get(a.dtype, str(a.dtype)), DTYPE_NAMES.get(c.dtype, str(c.dtype))
    flags = {"gather_a": bool(kwargs["GATHER_A"]), "scatter_c": bool(kwargs["SCATTER_C"])}
    flags |= {"fp32_ieee": bool(kwargs["FP32_IEEE"]), "trans_w": named_args["stride_bk"] == 1}
    target = running_target(a.device)
    kept = non_spilling_gmm_configs(configs, target, dtype, out_dtype, **flags)
    if not kept:
        warnings.warn(
            f"{SPILLING_CONFIGS_FILE.name} lists every grouped GEMM configuration as spilling on {target} "
            f"for {dtype} -> {out_dtype} {flags}: autotuning over all of them",
            stacklevel=2,
        )
        return list(configs)
    return kept


# The autotune key: besides N and K, every input of the pruning (the tensors' dtypes are in every
# key by Triton's rule), so one launch's choice is never reused where it is pruned.
_GMM_KEY = ["N", "K", "GATHER_A", "SCATTER_C", "FP32_IEEE", "stride_bk"]
_gmm_autotuned = {
    backend: triton.autotune(
        configs=configs, key=_GMM_KEY, prune_configs_by={"early_config_prune": _prune_spilling_gmm_configs}
    )(_gmm_kernel)
    for backend, configs in GMM_CONFIGS.items()
}


def tile_schedule(counts: torch.Tensor, num_rows: int, block_m: int) -> tuple[torch.Tensor, ...]:
    """Per M-tile (group id or -1, first sorted row) and per-group end offsets; no host sync."""
    G = counts.numel()
    counts = counts.to(torch.int64)
    group_end = torch.cumsum(counts, 0)
    tiles = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)
    max_tiles = (num_rows + block_m - 1) // block_m + G
    ids = torch.arange(max_tiles, device=counts.device)
    group = torch.searchsorted(tile_end, ids, right=True)
    valid = group < G
    group_c = group.clamp(max=max(G - 1, 0))
    first_tile = tile_end[group_c] - tiles[group_c]
    tile_row = (group_end - counts)[group_c] + (ids - first_tile) * block_m
    tile_group = torch.where(valid, group, torch.full_like(group, -1))
    return tile_group, tile_row, group_end


def grouped_gemm_triton(
    x: torch.Tensor,
    w: torch.Tensor,
    counts: torch.Tensor,
    x_index: torch.Tensor | None = None,
    out_index: torch.Tensor | None = None,
    out_rows: int | None = None,
    trans_w: bool = False,
    block_sizes: dict[str, int] | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """out[out_index[m]] = x[x_index[m]] @ (w[g] or w[g]^T) for sorted rows m of group g.

    `out_dtype` (default x's) lets intermediates of a backward stay fp32 for 16-bit inputs.
    """
    num_rows = x_index.numel() if x_index is not None else x.shape[0]
    K = x.shape[1]
    N = w.shape[1] if trans_w else w.shape[2]
    rows_out = num_rows if out_rows is None else out_rows
    alloc = torch.zeros if out_index is not None else torch.empty  # unscattered rows stay zero
    result_dtype = out_dtype or x.dtype
    out = alloc(rows_out, N, device=x.device, dtype=_store_dtype(result_dtype))
    if num_rows == 0 or N == 0:
        return out.to(result_dtype)
    stride_bk, stride_bn = (w.stride(2), w.stride(1)) if trans_w else (w.stride(1), w.stride(2))
    block_m = (block_sizes or {}).get("BLOCK_M", DEFAULT_BLOCK_M)
    tile_group, tile_row, group_end = tile_schedule(counts, num_rows, block_m)
    dummy = tile_row  # an int64 tensor for the pointer arguments a disabled feature ignores
    args = (
        x,
        w,
        out,
        x_index if x_index is not None else dummy,
        out_index if out_index is not None else dummy,
        tile_group,
        tile_row,
        group_end,
        N,
        K,
        x.stride(0),
        x.stride(1),
        w.stride(0),
        stride_bk,
        stride_bn,
        out.stride(0),
        out.stride(1),
    )
    flags = {"GATHER_A": x_index is not None, "SCATTER_C": out_index is not None, **_flags(x, w)}
    if block_sizes is not None or interpreting():
        sizes = {"BLOCK_M": block_m, "BLOCK_N": 32, "BLOCK_K": 32, **(block_sizes or {})}
        grid = (tile_group.numel(), triton.cdiv(N, sizes["BLOCK_N"]))
        _gmm_kernel[grid](*args, **flags, **sizes)
    else:
        grid = lambda meta: (tile_group.numel(), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
        _gmm_autotuned["hip" if torch.version.hip else "cuda"][grid](*args, **flags, BLOCK_M=block_m)
    return out.to(result_dtype)


# ---------------------------------------------------------------------------------------------
# grouped weight gradient: dW[g] = A[a_row(m)]^T @ B[b_row(m)] summed over the rows m of group g
# ---------------------------------------------------------------------------------------------
@triton.jit
def _gmm_dw_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    a_rows_ptr,
    b_rows_ptr,
    group_end_ptr,
    counts_ptr,
    K,
    N,
    stride_am,
    stride_ak,
    stride_bm,
    stride_bn,
    stride_cg,
    stride_ck,
    stride_cn,
    GATHER_A: tl.constexpr,
    GATHER_B: tl.constexpr,
    UPCAST: tl.constexpr,
    FP32_IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    g = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_n = tl.program_id(2)
    end = tl.load(group_end_ptr + g)
    start = end - tl.load(counts_ptr + g)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k = offs_k < K
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        mask_m = offs_m < end
        if GATHER_A:
            a_rows = tl.load(a_rows_ptr + offs_m, mask=mask_m, other=0)
        else:
            a_rows = offs_m
        if GATHER_B:
            b_rows = tl.load(b_rows_ptr + offs_m, mask=mask_m, other=0)
        else:
            b_rows = offs_m
        a = tl.load(
            a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + b_rows[:, None] * stride_bm + offs_n[None, :] * stride_bn,
            mask=mask_m[:, None] & mask_n[None, :],
            other=0.0,
        )
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if FP32_IEEE:
            acc = tl.dot(tl.trans(a), b, acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(a), b, acc)
    tl.store(
        c_ptr + g.to(tl.int64) * stride_cg + offs_k[:, None] * stride_ck + offs_n[None, :] * stride_cn,
        acc.to(c_ptr.dtype.element_ty),
        mask=mask_k[:, None] & mask_n[None, :],
    )


# The weight gradient is not autotuned: one block shape on GPUs (smaller ones when a caller fixes
# them, and under the interpreter), in 8 warps: in 4, the exact fp32 path (FP32_IEEE, fp32 without
# TF32, torch's default) with a gather compiled for sm_80 to 32 registers and ~10 KB of spills per
# thread, and others spilled too (compiled ahead of time, sparse_train/kernels/aot.py).
_DW_BLOCKS = {"BLOCK_M": 64, "BLOCK_K": 64, "BLOCK_N": 64}
_DW_OPTIONS = {"num_warps": 8}


def grouped_gemm_dw_triton(
    x: torch.Tensor,
    dy: torch.Tensor,
    counts: torch.Tensor,
    x_index: torch.Tensor | None = None,
    dy_index: torch.Tensor | None = None,
    block_sizes: dict[str, int] | None = None,
) -> torch.Tensor:
    """dW[g] = sum over group g's sorted rows m of x[x_index[m]]^T dy[dy_index[m]]; [G, K, N]."""
    G, K, N = counts.numel(), x.shape[1], dy.shape[1]
    out = torch.empty(G, K, N, device=x.device, dtype=_store_dtype(x.dtype))
    if G == 0 or K == 0 or N == 0:
        return out.to(x.dtype)
    counts = counts.to(torch.int64)
    group_end = torch.cumsum(counts, 0)
    sizes = {"BLOCK_M": 32, "BLOCK_K": 32, "BLOCK_N": 32, **(block_sizes or {})}
    options: dict[str, int] = {}
    if block_sizes is None and not interpreting():
        sizes, options = dict(_DW_BLOCKS), dict(_DW_OPTIONS)
    dummy = group_end
    grid = (G, triton.cdiv(K, sizes["BLOCK_K"]), triton.cdiv(N, sizes["BLOCK_N"]))
    _gmm_dw_kernel[grid](
        x,
        dy,
        out,
        x_index if x_index is not None else dummy,
        dy_index if dy_index is not None else dummy,
        group_end,
        counts,
        K,
        N,
        x.stride(0),
        x.stride(1),
        dy.stride(0),
        dy.stride(1),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        GATHER_A=x_index is not None,
        GATHER_B=dy_index is not None,
        **_flags(x, dy),
        **sizes,
        **options,
    )
    return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# row moves: permute (gather rows, optionally scaled) and unpermute (weighted scatter-add)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _gather_rows_kernel(
    src_ptr,
    out_ptr,
    index_ptr,
    scale_ptr,
    M,
    D,
    stride_s,
    stride_o,
    SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_m = offs_m < M
    mask = mask_m[:, None] & (offs_d[None, :] < D)
    rows = tl.load(index_ptr + offs_m, mask=mask_m, other=0)
    vals = tl.load(src_ptr + rows[:, None] * stride_s + offs_d[None, :], mask=mask, other=0.0)
    if SCALE:
        scale = tl.load(scale_ptr + offs_m, mask=mask_m, other=0.0)
        vals = vals.to(tl.float32) * scale.to(tl.float32)[:, None]
    tl.store(out_ptr + offs_m[:, None] * stride_o + offs_d[None, :], vals.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scatter_add_rows_kernel(
    src_ptr,
    out_ptr,
    index_ptr,
    weight_ptr,
    M,
    D,
    stride_s,
    stride_o,
    WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_m = offs_m < M
    mask = mask_m[:, None] & (offs_d[None, :] < D)
    rows = tl.load(index_ptr + offs_m, mask=mask_m, other=0)
    vals = tl.load(src_ptr + offs_m[:, None] * stride_s + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    if WEIGHT:
        vals = vals * tl.load(weight_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)[:, None]
    tl.atomic_add(out_ptr + rows[:, None] * stride_o + offs_d[None, :], vals, mask=mask)


_ROW_BLOCKS = {"BLOCK_M": 32, "BLOCK_D": 64}


def gather_rows_triton(src: torch.Tensor, index: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """out[i] = src[index[i]] (* scale[i])."""
    src = src.contiguous()
    out = torch.empty(index.numel(), src.shape[1], device=src.device, dtype=_store_dtype(src.dtype))
    if out.numel():
        grid = (triton.cdiv(index.numel(), _ROW_BLOCKS["BLOCK_M"]), triton.cdiv(src.shape[1], _ROW_BLOCKS["BLOCK_D"]))
        _gather_rows_kernel[grid](
            src,
            out,
            index,
            scale if scale is not None else index,
            index.numel(),
            src.shape[1],
            src.stride(0),
            out.stride(0),
            SCALE=scale is not None,
            **_ROW_BLOCKS,
        )
    return out.to(src.dtype)


def scatter_add_rows_triton(
    src: torch.Tensor,
    index: torch.Tensor,
    num_rows: int,
    weight: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """out[index[i]] += src[i] (* weight[i]); accumulated in fp32, returned in out_dtype (src's)."""
    src = src.contiguous()
    out = torch.zeros(num_rows, src.shape[1], device=src.device, dtype=torch.float32)
    if src.numel():
        grid = (triton.cdiv(index.numel(), _ROW_BLOCKS["BLOCK_M"]), triton.cdiv(src.shape[1], _ROW_BLOCKS["BLOCK_D"]))
        _scatter_add_rows_kernel[grid](
            src,
            out,
            index,
            weight if weight is not None else index,
            index.numel(),
            src.shape[1],
            src.stride(0),
            out.stride(0),
            WEIGHT=weight is not None,
            **_ROW_BLOCKS,
        )
    return out.to(out_dtype or src.dtype)
