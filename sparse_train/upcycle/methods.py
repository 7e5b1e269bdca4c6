"""Dense -> MoE conversions of the FFN of chosen blocks; everything else is copied unchanged.

    copy   (sparse upcycling) every expert a copy of the dense SwiGLU, the router small and
           random; combine weights renormalised over the top k, so at step 0 the layer computes
           exactly the dense FFN (sum of k equal outputs with weights summing to 1). Options:
           `noise` (each expert's weights times 1 + noise * N(0, 1)) and `drop_ratio`
           (Drop-Upcycling: per expert, that share of hidden neurons re-initialised at random,
           a different subset per expert), both of which break the exact equality on purpose.
    split  (LLaMA-MoE / granular upcycling) the F hidden neurons partitioned into E groups of
           F/E, contiguously, at random, or by k-means on the neurons' weight vectors
           [gate row, up row, down column]; each group an expert of width F/E. Experts combine
           with unit weights (router.combine: unit, straight-through to the router), so with
           all E experts selected the layer sums to the dense FFN exactly.

Shape legend: E experts, D model width, F dense hidden width, G = F / E neurons per expert.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from sparse_train.config import Config, ConfigError, config_from_dict

Partition = Literal["contiguous", "random", "kmeans"]
ROUTER_INIT_STD = 0.02  # "small and random": logits near 0, so the first routing is near uniform


@dataclass
class UpcycleSpec:
    method: str
    num_experts: int
    top_k: int
    layers: list[int] | None = None  # blocks converted; None = every block
    seed: int = 0
    noise: float = 0.0  # copy
    drop_ratio: float = 0.0  # copy (Drop-Upcycling)
    partition: Partition = "contiguous"  # split


def moe_config(dense: Config, spec: UpcycleSpec, expert_hidden: int, combine: str) -> Config:
    if dense.model.ffn != "dense":
        raise ConfigError("--from", f"upcycling starts from a dense model; this one is model.ffn={dense.model.ffn}")
    if not 1 <= spec.top_k <= spec.num_experts:
        raise ConfigError("--top-k", f"must be in [1, --num-experts={spec.num_experts}], got {spec.top_k}")
    layers = spec.layers if spec.layers is not None else list(range(dense.model.n_layers))
    bad = [i for i in layers if not 0 <= i < dense.model.n_layers]
    if bad:
        raise ConfigError("--layers", f"block indices must be in [0, {dense.model.n_layers}), got {bad}")
    data = dense.to_dict()
    data["model"]["ffn"] = "moe"
    data["moe"] = {**data["moe"], "num_experts": spec.num_experts, "expert_hidden": expert_hidden, "layers": layers,
                   "num_shared_experts": 0, "shared_expert_gate": False, "capacity_factor": None}  # fmt: skip
    data["router"] = {**data["router"], "top_k": spec.top_k, "renormalize": True, "combine": combine}
    return config_from_dict(data)


def _dense_ffn(state: dict[str, torch.Tensor], i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate [F, D], up [F, D], down [D, F]) of block i's dense SwiGLU (nn.Linear layout)."""
    p = f"blocks.{i}.ffn"
    return state[f"{p}.w_gate.weight"], state[f"{p}.w_up.weight"], state[f"{p}.w_down.weight"]


def _stacked(gate_EGD: torch.Tensor, up_EGD: torch.Tensor, down_EDG: torch.Tensor) -> dict[str, torch.Tensor]:
    """Our stacked expert tensors from per-expert nn.Linear-layout weights."""
    return {
        "experts.w_gate_up_ED2F": torch.stack([gate_EGD, up_EGD], dim=2).transpose(1, 3).contiguous(),
        "experts.w_down_EFD": down_EDG.transpose(1, 2).contiguous(),
    }


def upcycled_config(dense_cfg: Config, spec: UpcycleSpec) -> Config:
    """The MoE config `spec` makes of a dense model (every request checked here, before any work)."""
    if spec.method == "copy":
        return moe_config(dense_cfg, spec, dense_cfg.model.ffn_hidden, "weights")
    if spec.method == "split":
        if dense_cfg.model.ffn_hidden % spec.num_experts:
            raise ConfigError(
                "--num-experts", f"must divide the FFN width ({dense_cfg.model.ffn_hidden}), got {spec.num_experts}"
            )
        return moe_config(dense_cfg, spec, dense_cfg.model.ffn_hidden // spec.num_experts, "unit")
    raise ConfigError("--method", f"unknown method {spec.method!r}; allowed: copy, split")


def upcycle(dense_cfg: Config, state: dict[str, torch.Tensor], spec: UpcycleSpec, progress=None):
    """(MoE config, MoE state dict) of a dense model; `progress(i)` is called per converted block."""
    cfg = upcycled_config(dense_cfg, spec)
    convert = _copy_block if spec.method == "copy" else _split_block
    g = torch.Generator().manual_seed(spec.seed)
    out = {k: v for k, v in state.items() if not k.startswith(tuple(f"blocks.{i}.ffn." for i in cfg.moe.layers))}
    for i in cfg.moe.layers:
        gate, up, down = _dense_ffn(state, i)
        block = convert(gate, up, down, spec, g)
        block["router.weight"] = torch.randn(spec.num_experts, gate.shape[1], generator=g) * ROUTER_INIT_STD
        out.update({f"blocks.{i}.ffn.{k}": v.to(gate.dtype) for k, v in block.items()})
        if progress is not None:
            progress(i)
    return cfg, out


def _copy_block(gate, up, down, spec: UpcycleSpec, g: torch.Generator) -> dict[str, torch.Tensor]:
    E = spec.num_experts
    experts = [gate.expand(E, -1, -1).clone(), up.expand(E, -1, -1).clone(), down.expand(E, -1, -1).clone()]
    if spec.drop_ratio > 0:  # Drop-Upcycling: a different random subset of neurons per expert
        F = gate.shape[0]
        n_drop = int(round(spec.drop_ratio * F))
        for e in range(E):
            neurons = torch.randperm(F, generator=g)[:n_drop]
            for w, neuron_dim in zip(experts, (0, 0, 1), strict=True):  # gate/up rows, down columns
                shape = list(w[e].shape)
                shape[neuron_dim] = n_drop
                fresh = torch.randn(shape, generator=g) * w[e].std()
                w[e].index_copy_(neuron_dim, neurons, fresh.to(w.dtype))
    if spec.noise > 0:
        experts = [w * (1 + spec.noise * torch.randn(w.shape, generator=g)) for w in experts]
    return _stacked(*experts)


def neuron_groups(gate, up, down, num_groups: int, partition: Partition, g: torch.Generator) -> torch.Tensor:
    """[E, G] neuron indices per expert (each neuron in exactly one group of equal size)."""
    F = gate.shape[0]
    size = F // num_groups
    if partition == "contiguous":
        return torch.arange(F).view(num_groups, size)
    if partition == "random":
        return torch.randperm(F, generator=g).view(num_groups, size)
    if partition == "kmeans":
        features = torch.cat([gate, up, down.t()], dim=1).float()
        return balanced_kmeans(features, num_groups, g)
    raise ConfigError("--partition", f"unknown partition {partition!r}; allowed: contiguous, random, kmeans")


def balanced_kmeans(features: torch.Tensor, k: int, g: torch.Generator, iters: int = 20) -> torch.Tensor:
    """k equal-size clusters of the rows of `features` ([N, d], N divisible by k): Lloyd's
    iterations with a balanced assignment step (rows taken greedily by distance into clusters
    with room). Returns [k, N / k] row indices, sorted within each cluster."""
    N = features.shape[0]
    size = N // k
    x = torch.nn.functional.normalize(features, dim=1)
    centers = x[torch.randperm(N, generator=g)[:k]].clone()
    assign = torch.zeros(N, dtype=torch.int64)
    for _ in range(iters):
        dist = torch.cdist(x, centers)  # [N, k]
        order = torch.argsort(dist.flatten())
        room = torch.full((k,), size)
        done = torch.zeros(N, dtype=torch.bool)
        for flat in order.tolist():
            row, cluster = divmod(flat, k)
            if not done[row] and room[cluster] > 0:
                assign[row], done[row] = cluster, True
                room[cluster] -= 1
        new_centers = torch.stack([x[assign == c].mean(0) for c in range(k)])
        if torch.allclose(new_centers, centers):
            break
        centers = new_centers
    return torch.stack([torch.nonzero(assign == c).flatten() for c in range(k)])


def _split_block(gate, up, down, spec: UpcycleSpec, g: torch.Generator) -> dict[str, torch.Tensor]:
    groups_EG = neuron_groups(gate, up, down, spec.num_experts, spec.partition, g)
    return _stacked(gate[groups_EG], up[groups_EG], down[:, groups_EG].permute(1, 0, 2))
