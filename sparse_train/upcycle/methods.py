"""Dense -> MoE / FFF conversions of the FFN of chosen blocks; everything else is copied unchanged.

    copy         (sparse upcycling) every expert a copy of the dense SwiGLU, the router small
                 and random; combine weights renormalised over the top k, so at step 0 the layer
                 computes exactly the dense FFN (k equal outputs, weights summing to 1). With
                 shared experts (`num_shared`, DeepSeek-V3's layout) they hold the dense FFN too,
                 and shared and routed parts each carry half of its output. Options:
                 `noise` (each expert's weights times 1 + noise * N(0, 1)) and `drop_ratio`
                 (Drop-Upcycling: per expert, that share of hidden neurons re-initialised at
                 random, a different subset per expert), both breaking the equality on purpose.
    split        (LLaMA-MoE) the F hidden neurons partitioned into E groups of F/E,
                 contiguously, at random, or by k-means on the neurons' weight vectors [gate
                 row, up row, down column]; experts combine with unit weights (router.combine:
                 unit, straight-through to the router), so all E selected sum to the dense FFN.
    granularity  (Megatron's granular upcycling; copy and split) g < E: the FFN cut into g
                 slices of F/g (split: by `partition`; copy: contiguously), each slice copied
                 into E/g experts. The g slices of one copy share a router row, so top-k (a
                 multiple of g) selects whole copies; their down projections are scaled by g,
                 so renormalised weights (1/g of a copy's weight per slice) sum back to the
                 dense FFN at step 0. copy is granularity 1, split (unit combine) granularity E.
    moefication, cmoe, fff       carved from calibration activations: sparse_train.upcycle.carve

Shape legend: E experts, D model width, F dense hidden width, G neurons per expert, L leaves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from sparse_train.config import Config, ConfigError, compose_config
from sparse_train.lazy import whole
from sparse_train.models.init import tile_seed
from sparse_train.models.transformer import Transformer
from sparse_train.upcycle import carve
from sparse_train.upcycle.calibration import Calibration

Partition = Literal["contiguous", "random", "kmeans"]
METHODS = ("copy", "split", "moefication", "cmoe", "fff")
CALIBRATED = ("moefication", "cmoe", "fff")
ROUTER_INIT_STD = 0.02  # "small and random": logits near 0, so the first routing is near uniform


@dataclass
class UpcycleSpec:
    method: str
    num_experts: int  # routed experts (fff: leaves, a power of two)
    top_k: int
    layers: list[int] | None = None  # blocks converted; None = every block
    seed: int = 0
    noise: float = 0.0  # copy
    drop_ratio: float = 0.0  # copy (Drop-Upcycling)
    partition: Partition = "contiguous"  # split
    granularity: int | None = None  # copy / split: slices per dense FFN; None = 1 (copy) or E (split)
    num_shared: int | None = None  # shared experts: copy (default 0) the dense FFN, half-weighted; cmoe (default 1)
    overrides: tuple[str, ...] = ()  # `section.key=value` on the upcycled config (e.g. DeepSeek-V3's router)

    @property
    def shared(self) -> int:
        """Shared experts: num_shared, or the method's default (cmoe 1, others 0)."""
        if self.num_shared is not None:
            return self.num_shared
        return 1 if self.method == "cmoe" else 0

    @property
    def slices(self) -> int:
        if self.granularity is not None:
            return self.granularity
        return self.num_experts if self.method == "split" else 1


def _sparse_config(dense: Config, spec: UpcycleSpec, sections: dict[str, dict]) -> Config:
    if dense.model.ffn != "dense":
        raise ConfigError("--from", f"upcycling starts from a dense model; this one is model.ffn={dense.model.ffn}")
    if not 1 <= spec.top_k <= spec.num_experts:
        raise ConfigError("--top-k", f"must be in [1, --num-experts={spec.num_experts}], got {spec.top_k}")
    layers = spec.layers if spec.layers is not None else list(range(dense.model.n_layers))
    bad = [i for i in layers if not 0 <= i < dense.model.n_layers]
    if bad:
        raise ConfigError("--layers", f"block indices must be in [0, {dense.model.n_layers}), got {bad}")
    data = dense.to_dict()
    data["model"].update(sparse_layers=layers, sparse_every_n=1)
    data["moe"] = {
        **data["moe"],
        "num_shared_experts": 0,
        "shared_expert_gate": False,
        "capacity_factor": None,
    }
    for section, values in sections.items():
        data[section] = {**data[section], **values}
    return compose_config(data, spec.overrides)


def _moe_config(dense: Config, spec: UpcycleSpec, expert_hidden: int, combine: str, **moe) -> Config:
    return _sparse_config(
        dense,
        spec,
        {
            "model": {"ffn": "moe"},
            "moe": {"num_experts": spec.num_experts, "expert_hidden": expert_hidden, **moe},
            "router": {"top_k": spec.top_k, "renormalize": True, "combine": combine},
        },
    )


def _divides(width: int, parts: int, what: str = "") -> int:
    if width % parts:
        raise ConfigError("--num-experts", f"{what}must divide the FFN width ({width}), got {parts}")
    return width // parts


def upcycled_config(dense_cfg: Config, spec: UpcycleSpec) -> Config:
    """The sparse config `spec` makes of a dense model (every request checked here, before any work)."""
    F, E = dense_cfg.model.ffn_hidden, spec.num_experts
    if spec.shared and spec.method not in ("copy", "cmoe"):
        raise ConfigError("--num-shared", f"{spec.method} has no shared experts (copy and cmoe have)")
    if spec.method in ("copy", "split"):
        g = spec.slices
        if g < 1 or E % g:
            raise ConfigError("--granularity", f"must divide --num-experts ({E}), got {g}")
        if spec.method == "split" and g == E:
            return _moe_config(dense_cfg, spec, _divides(F, E), "unit")
        if spec.top_k % g:
            raise ConfigError("--top-k", f"must be a multiple of --granularity ({g}) to select whole copies")
        if F % g:
            raise ConfigError("--granularity", f"must divide the FFN width ({F}), got {g}")
        shared = spec.shared
        if shared:  # DeepSeek-V3's layout: shared experts beside the routed ones
            shared_width = _divides(F, shared, "--num-shared ")
            return _moe_config(
                dense_cfg, spec, F // g, "weights", num_shared_experts=shared, shared_expert_hidden=shared_width
            )
        return _moe_config(dense_cfg, spec, F // g, "weights")
    if spec.method == "moefication":
        return _moe_config(dense_cfg, spec, _divides(F, E), "unit")
    if spec.method == "cmoe":
        shared = spec.shared
        if shared < 1:
            raise ConfigError("--num-shared", f"must be >= 1 (cmoe carves shared experts), got {shared}")
        G = _divides(F, E + shared, "with --num-shared, their sum ")
        return _moe_config(dense_cfg, spec, G, "unit", num_shared_experts=shared, shared_expert_hidden=G)
    if spec.method == "fff":
        if E < 2 or E & (E - 1):
            raise ConfigError("--num-experts", f"fff: the number of leaves must be a power of two >= 2, got {E}")
        leaf_width = _divides(F, E)
        mode = "hard" if spec.top_k == 1 else "topk_paths"
        return _sparse_config(
            dense_cfg,
            spec,
            {
                "model": {"ffn": "fff"},
                "fff": {
                    "depth": E.bit_length() - 1,
                    "leaf_width": leaf_width,
                    "leaf_activation": "swiglu",
                    "mode": mode,
                    "top_k": spec.top_k,
                    "combine": "unit",
                    "master_leaf": False,
                },
            },
        )
    raise ConfigError("--method", f"unknown method {spec.method!r}; allowed: {', '.join(METHODS)}")


def upcycle(
    dense_cfg: Config,
    state: Mapping[str, Any],
    spec: UpcycleSpec,
    progress: Callable[[int], Any] | None = None,
    calib: Calibration | None = None,
) -> tuple[Config, UpcycledState]:
    """(sparse config, its tensors) of a dense model whose tensors are `state` (whole or lazily
    read). The conversion runs block by block as the result is read; `progress(i)` is called as
    block i is converted. moefication, cmoe and fff need `calib` (the converted blocks' FFN inputs)."""
    cfg = upcycled_config(dense_cfg, spec)
    if spec.method in CALIBRATED and calib is None:
        raise ConfigError("--method", f"{spec.method} needs calibration data")
    return cfg, UpcycledState(cfg, state, spec, calib, progress)


class UpcycledState(Mapping[str, torch.Tensor]):
    """The sparse model's tensors, each converted block computed when one of its tensors is read
    and kept until another block is: read in order (as the writers do), one block is converted
    at a time and the dense model is never whole in memory. Every block draws from its own
    generator (seeded from the spec's seed and the block), so the result does not depend on the
    order blocks are read in, nor on how often."""

    def __init__(
        self,
        cfg: Config,
        dense: Mapping[str, Any],
        spec: UpcycleSpec,
        calib: Calibration | None,
        progress: Callable[[int], Any] | None,
    ) -> None:
        self.cfg, self.dense, self.spec, self.calib, self.progress = cfg, dense, spec, calib, progress
        with torch.device("meta"):
            names = list(Transformer(cfg.model, cfg.moe, cfg.router, cfg.fff).state_dict())
        self._names = names  # model order: a block's tensors together, blocks in order
        self._block_of = {name: _converted_block(name, cfg.model.sparse_layers) for name in names}
        self._current: tuple[int, dict[str, torch.Tensor]] | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._block_of:
            raise KeyError(name)
        i = self._block_of[name]
        if i is None:
            return whole(self.dense[name])
        if self._current is None or self._current[0] != i:
            self._current = None  # the previous block goes before the next is built
            self._current = (i, self._convert(i))
        return self._current[1][name]

    def __contains__(self, name: object) -> bool:  # Mapping's default would read (convert) to find out
        return name in self._block_of

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def _convert(self, i: int) -> dict[str, torch.Tensor]:
        gate, up, down = (whole(t) for t in _dense_ffn(self.dense, i))
        g = torch.Generator().manual_seed(tile_seed(self.spec.seed, "upcycle", (i,)))
        x = self.calib.fit[i] if self.calib is not None else None
        block = _CONVERT[self.spec.method](gate.float(), up.float(), down.float(), self.spec, g, x)
        if self.cfg.model.ffn == "moe" and self.cfg.router.bias_update_rate > 0:  # aux-free balancing starts unbiased
            block["router.expert_bias_E"] = torch.zeros(self.cfg.moe.num_experts)
        if self.progress is not None:
            self.progress(i)
        return {f"blocks.{i}.ffn.{k}": v.to(gate.dtype).contiguous() for k, v in block.items()}


def _converted_block(name: str, sparse_layers: list[int]) -> int | None:
    """The converted block whose FFN holds `name`, or None."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "blocks" and parts[2] == "ffn" and int(parts[1]) in sparse_layers:
        return int(parts[1])
    return None


def _dense_ffn(state: Mapping[str, Any], i: int) -> tuple[Any, Any, Any]:
    """(gate [F, D], up [F, D], down [D, F]) of block i's dense SwiGLU (nn.Linear layout)."""
    p = f"blocks.{i}.ffn"
    return state[f"{p}.w_gate.weight"], state[f"{p}.w_up.weight"], state[f"{p}.w_down.weight"]


def _stacked(gate_EGD: torch.Tensor, up_EGD: torch.Tensor, down_EDG: torch.Tensor) -> dict[str, torch.Tensor]:
    """Our stacked expert tensors from per-expert nn.Linear-layout weights."""
    return {
        "experts.w_gate_up": torch.stack([gate_EGD, up_EGD], dim=2).transpose(1, 3).contiguous(),
        "experts.w_down": down_EDG.transpose(1, 2).contiguous(),
    }


def _experts_of(gate, up, down, groups_EG: torch.Tensor) -> dict[str, torch.Tensor]:
    return _stacked(gate[groups_EG], up[groups_EG], down[:, groups_EG].permute(1, 0, 2))


def _random_router(num_rows: int, d_model: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(num_rows, d_model, generator=g) * ROUTER_INIT_STD


# ---- copy / split -----------------------------------------------------------------------------
def neuron_groups(gate, up, down, num_groups: int, partition: Partition, g: torch.Generator) -> torch.Tensor:
    """[num_groups, F / num_groups] neuron indices (each neuron in exactly one group)."""
    F = gate.shape[0]
    size = F // num_groups
    if partition == "contiguous":
        return torch.arange(F).view(num_groups, size)
    if partition == "random":
        return torch.randperm(F, generator=g).view(num_groups, size)
    if partition == "kmeans":
        return carve.balanced_kmeans(torch.cat([gate, up, down.t()], dim=1), num_groups, g)
    raise ConfigError("--partition", f"unknown partition {partition!r}; allowed: contiguous, random, kmeans")


def _granular_block(gate, up, down, spec: UpcycleSpec, g: torch.Generator, x=None) -> dict[str, torch.Tensor]:
    """E / slices copies of the FFN cut into `slices` slices (copy: one slice, the whole FFN)."""
    E, slices = spec.num_experts, spec.slices
    partition = spec.partition if spec.method == "split" else "contiguous"
    groups = neuron_groups(gate, up, down, slices, partition, g)
    groups_EG = groups.repeat(E // slices, 1)  # expert c * slices + j: copy c, slice j
    experts = [gate[groups_EG], up[groups_EG], down[:, groups_EG].permute(1, 0, 2) * slices]
    if spec.drop_ratio > 0:  # Drop-Upcycling: a different random subset of neurons per expert
        width = experts[0].shape[1]
        n_drop = int(round(spec.drop_ratio * width))
        for e in range(E):
            neurons = torch.randperm(width, generator=g)[:n_drop]
            for w, neuron_dim in zip(experts, (0, 0, 1), strict=True):  # gate/up rows, down columns
                shape = list(w[e].shape)
                shape[neuron_dim] = n_drop
                w[e].index_copy_(neuron_dim, neurons, torch.randn(shape, generator=g) * w[e].std())
    if spec.noise > 0:
        experts = [w * (1 + spec.noise * torch.randn(w.shape, generator=g)) for w in experts]
    router = _random_router(E // slices, gate.shape[1], g).repeat_interleave(slices, dim=0)
    if not spec.shared:
        return {**_stacked(*experts), "router.weight": router}
    # shared experts (one SwiGLU, the dense FFN's width) and routed copies each carry half the
    # FFN's output: together the dense FFN again at step 0
    experts[2] = experts[2] / 2
    shared = {"shared_experts.w_gate.weight": gate, "shared_experts.w_up.weight": up}
    return {**_stacked(*experts), "router.weight": router, **shared, "shared_experts.w_down.weight": down / 2}


def _split_block(gate, up, down, spec: UpcycleSpec, g: torch.Generator, x=None) -> dict[str, torch.Tensor]:
    if spec.slices != spec.num_experts:
        return _granular_block(gate, up, down, spec, g)
    groups_EG = neuron_groups(gate, up, down, spec.num_experts, spec.partition, g)
    return {**_experts_of(gate, up, down, groups_EG), "router.weight": _random_router(len(groups_EG), gate.shape[1], g)}


# ---- carved from calibration activations ------------------------------------------------------
def _moefication_block(gate, up, down, spec: UpcycleSpec, g: torch.Generator, x) -> dict[str, torch.Tensor]:
    groups_EG, router_ED = carve.moefication(gate, up, down, x, spec.num_experts, g)
    return {**_experts_of(gate, up, down, groups_EG), "router.weight": router_ED}


def _cmoe_block(gate, up, down, spec: UpcycleSpec, g: torch.Generator, x) -> dict[str, torch.Tensor]:
    shared, groups_EG, router_ED = carve.cmoe(gate, up, down, x, spec.num_experts, spec.shared, spec.top_k, g)
    return {
        **_experts_of(gate, up, down, groups_EG),
        "router.weight": router_ED,
        "shared_experts.w_gate.weight": gate[shared],
        "shared_experts.w_up.weight": up[shared],
        "shared_experts.w_down.weight": down[:, shared],
    }


def _fff_block(gate, up, down, spec: UpcycleSpec, g: torch.Generator, x) -> dict[str, torch.Tensor]:
    leaves_LG, node_weight_ND, node_bias_N = carve.fff_tree(gate, up, down, x, spec.num_experts.bit_length() - 1, g)
    return {
        **_experts_of(gate, up, down, leaves_LG),
        "tree.node_weight": node_weight_ND,
        "tree.node_bias": node_bias_N,
    }


_CONVERT = {
    "copy": _granular_block,
    "split": _split_block,
    "moefication": _moefication_block,
    "cmoe": _cmoe_block,
    "fff": _fff_block,
}
