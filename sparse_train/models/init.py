"""Seeded, layout-independent initialisation of a model's parameters, whole or sharded.

Every element's initial value depends only on the seed, its parameter's name and its position
in the whole (unsharded) tensor: never on the layout, the world size, the rank, the device or
the order parameters are visited in. So a model built on the meta device, split and sharded,
then materialised rank by rank (`materialize`) holds exactly the weights one process would,
and no rank draws or holds another rank's part on the way (decision 40).

How: each whole tensor is cut into a fixed grid of tiles of at most `TILE_ELEMENTS` elements
(a function of the tensor's shape alone). Tile t of parameter `name` is drawn from its own
CPU generator, seeded with a hash of (seed, name, t). A shard draws the tiles it overlaps and
keeps the overlap: its extra work and memory are one tile at a time (drawn straight into a CPU
fp32 shard; a shard on another device or dtype is drawn on the CPU, then copied over).

Parameters may be DTensors (tensor-, expert- or FSDP-sharded): their local shard's place in
the whole tensor comes from the same function DCP uses to save them. No process group is
touched here.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from sparse_train.config import ModelConfig
from sparse_train.lazy import Region

TILE_ELEMENTS = 1 << 16

# Projections into the residual stream: initialised with the smaller std (GPT-2).
OUTPUT_PROJECTIONS = ("wo.weight", "w_down.weight", "w_down", "w_out.weight", "w_out")
# undecided FFF nodes, an even master blend, biases (routed experts' too: b_gate_up [E, 2, F],
# b_down [E, D]), MoE++ gating residuals (each starts as a plain router)
ZERO_INIT = ("node_bias", "master_logit", ".bias", ".b_gate_up", ".b_down", "gating_residual.weight")

# fill(out, generator): draw one tile's values into `out` (a CPU fp32 tensor of the tile's shape)
TileFill = Callable[[torch.Tensor, torch.Generator], Any]


def tile_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The tile grid of a whole tensor: trailing dims whole while they fit TILE_ELEMENTS, then
    as many rows of the next dim as fit, single rows of the leading dims."""
    budget, edges = TILE_ELEMENTS, []
    for size in reversed(shape):
        edge = max(1, min(size, budget))
        edges.append(edge)
        budget = max(1, budget // edge)
    return tuple(reversed(edges))


def tile_seed(seed: int, name: str, tile_index: tuple[int, ...]) -> int:
    key = f"{seed}/{name}/{','.join(map(str, tile_index))}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def _tiles(shape: tuple[int, ...], offset: tuple[int, ...], size: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
    """Grid indices of the tiles overlapping the box [offset, offset + size)."""
    edges = tile_shape(shape)
    spans = [range(o // e, (o + n - 1) // e + 1) for o, n, e in zip(offset, size, edges, strict=True)]
    return itertools.product(*spans)


def draw_region(
    name: str,
    seed: int,
    shape: tuple[int, ...],
    offset: tuple[int, ...],
    size: tuple[int, ...],
    fill: TileFill,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The box [offset, offset + size) of the whole tensor `name` of `shape`, drawn into `out`
    (a CPU fp32 tensor of that size) or a new one."""
    out = torch.empty(size) if out is None else out
    if out.numel() == 0:
        return out
    edges = tile_shape(shape)
    for index in _tiles(shape, offset, size):
        start = [i * e for i, e in zip(index, edges, strict=True)]
        tile = torch.empty([min(e, s - a) for e, s, a in zip(edges, shape, start, strict=True)])
        fill(tile, torch.Generator().manual_seed(tile_seed(seed, name, index)))
        lo = [max(a, o) for a, o in zip(start, offset, strict=True)]
        hi = [min(a + t, o + n) for a, t, o, n in zip(start, tile.shape, offset, size, strict=True)]
        out[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offset, strict=True))] = tile[
            tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start, strict=True))
        ]
    return out


def local_region(param: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(local tensor, whole shape, local offset in it, local shape) of a parameter or DTensor."""
    if isinstance(param, DTensor):
        shape = tuple(param.shape)
        size, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        return param.to_local(), shape, tuple(offset), tuple(size)
    return param, tuple(param.shape), (0,) * param.dim(), tuple(param.shape)


def region_slices(offset: tuple[int, ...], size: tuple[int, ...]) -> Region:
    return tuple(slice(o, o + n) for o, n in zip(offset, size, strict=True))


def init_rule(name: str, param: torch.Tensor, m: ModelConfig) -> TileFill:
    """Normal(0, init_std); output projections 1/sqrt(2 * n_layers) of that; biases, FFF node
    biases and master-leaf blend logits zero; other vectors (RMSNorm scales) one."""
    if name.endswith(ZERO_INIT):
        return lambda out, _g: out.zero_()
    if param.dim() == 1:
        return lambda out, _g: out.fill_(1.0)
    std = m.init_std / math.sqrt(2 * m.n_layers) if name.endswith(OUTPUT_PROJECTIONS) else m.init_std
    return lambda out, g: out.normal_(0.0, std, generator=g)


@torch.no_grad()
def init_parameters(module: nn.Module, m: ModelConfig, seed: int) -> None:
    """Every parameter of `module` (whole, a pipeline stage, or sharded) from the seed."""
    for name, param in module.named_parameters():
        local, shape, offset, size = local_region(param)
        rule = init_rule(name, param, m)
        if local.device.type == "cpu" and local.dtype == torch.float32:
            draw_region(name, seed, shape, offset, size, rule, out=local)  # in place: no copy of the shard
        else:  # drawn on the CPU in fp32 (the same values on every device), then one copy over
            local.copy_(draw_region(name, seed, shape, offset, size, rule))


@torch.no_grad()
def load_parameters(module: nn.Module, source: Mapping[str, Any]) -> None:
    """Every parameter's local part read from `source[name][region]`: a dict of whole tensors or
    lazily read ones (safetensors slices), so only this rank's part is ever read or copied."""
    for name, param in module.named_parameters():
        local, _shape, offset, size = local_region(param)
        local.copy_(source[name][region_slices(offset, size)])
