"""Sweep specs: a base training config, axes to vary, seeds, an optional compute budget.

    name: moe-vs-dense
    base: ../tiny-moe.yaml            # a training recipe, relative to this file
    set: [train.log_every=25]         # overrides for every trial
    axes:
      size:                           # a ladder: each rung sets several fields together
        - {model.d_model: 64, model.n_layers: 2, model.n_heads: 2, model.ffn_hidden: 128}
        - {model.d_model: 96, model.n_layers: 3, model.n_heads: 3, model.ffn_hidden: 192}
      # variant:                      # named alternatives: each sets several fields together
      #   - {name: softmax-lbl, router.score: softmax}
      #   - {name: sigmoid-bias, router.score: sigmoid, router.bias_update_rate: 1.0e-3}
      model.ffn: [dense, moe]         # an axis over one config field
      moe.num_experts: [4, 8]
      granularity: [1, 2]             # expert width = ffn_hidden / G, top_k = G: active FFN = dense
      train.steps: [100, 200]         # tokens = steps x batch x grad_accum x seq_len
      # tokens: [1.0e5, 2.0e5]        # or tokens directly: steps = ceil(tokens / tokens per step)
      # fff.depth: [3, 5]             # FFF points (model.ffn: fff) vary the tree depth
    points: grid                      # every combination; or a list of {axis: value} mappings
    seeds: [0]
    budget_flops: 1.0e13              # drop points whose training FLOPs exceed this (optional)

A point's value for an axis may be any config field by its dotted name; `size` (a list of
mappings), `variant` (a list of mappings, each with a `name` and the fields it sets, e.g. one
router per variant), `granularity` and `tokens` are the derived axes. An axis only applies to the models
it describes: dense and FFF points ignore `moe.*`, `router.*` and `granularity`, dense and MoE
points ignore `fff.*` (the duplicates this would make are dropped), so a grid over `model.ffn`
x `moe.num_experts` holds one dense point per size and step count.

Compute per point (recorded with every trial; sparse_train.sweeps.flops): total and active
parameters from the built model, training FLOPs C = 6 N_active D + 6 L S d D (Kaplan et al.
2020's 6ND with the attention-score term; N_active excludes the input embedding, L blocks, S
sequence length, d model width, D training tokens).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sparse_train.config import Config, ConfigError, load_config
from sparse_train.configtypes import field_help

DERIVED_AXES = ("size", "variant", "granularity", "tokens")
MOE_ONLY = ("moe.", "router.")


class SweepError(ConfigError):
    """A sweep spec, results directory or fit request that cannot be used; one line."""

    def __init__(self, message: str) -> None:
        super().__init__("sweep", message)


@dataclass
class Point:
    """One trial: its axis values, the config overrides they make, and the seed."""

    values: dict[str, Any]
    overrides: dict[str, Any]
    seed: int

    @property
    def trial_id(self) -> str:
        key = json.dumps({"o": self.overrides, "s": self.seed}, sort_keys=True)
        return hashlib.sha1(key.encode()).hexdigest()[:10]

    def set_args(self) -> list[str]:
        return [
            f"{k}={json.dumps(v) if v is None or isinstance(v, (list, dict, bool)) else v}"
            for k, v in self.overrides.items()
        ]


@dataclass
class SweepSpec:
    name: str
    path: Path
    base: Path
    sets: list[str]
    axes: dict[str, list[Any]]
    points: str | list[dict[str, Any]]
    seeds: list[int]
    budget_flops: float | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """Identifies the spec's content: a results directory belongs to one spec."""
        return hashlib.sha1(json.dumps(self.raw, sort_keys=True, default=str).encode()).hexdigest()[:12]

    def base_config(self, extra: list[str] | None = None) -> Config:
        return load_config(self.base, [*self.sets, *(extra or [])])


def load_spec(path: str | Path) -> SweepSpec:
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"no such sweep spec: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        raise SweepError(f"{path} is not valid YAML") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{path} must hold a mapping")
    unknown = sorted(set(raw) - {"name", "base", "set", "axes", "points", "seeds", "budget_flops"})
    if unknown:
        raise SweepError(f"{path}: unknown keys {unknown}")
    if "base" not in raw:
        raise SweepError(f"{path}: needs base: the training recipe every trial starts from")
    base = (path.parent / raw["base"]).resolve()
    axes = raw.get("axes") or {}
    if not isinstance(axes, dict) or not axes or not all(isinstance(v, list) and v for v in axes.values()):
        raise SweepError(f"{path}: axes must map each axis to a non-empty list of values")
    spec = SweepSpec(
        name=str(raw.get("name", path.stem)),
        path=path,
        base=base,
        sets=[str(s) for s in raw.get("set") or []],
        axes=axes,
        points=raw.get("points", "grid"),
        seeds=[int(s) for s in raw.get("seeds") or [0]],
        budget_flops=float(raw["budget_flops"]) if raw.get("budget_flops") is not None else None,
        raw=raw,
    )
    if not base.is_file():
        raise SweepError(f"{path}: base recipe {raw['base']} not found (looked for {base})")
    _check_axes(spec)
    return spec


def _check_axes(spec: SweepSpec) -> None:
    known = {name for name, _, _ in field_help(Config)}
    for axis, values in spec.axes.items():
        if axis == "size":
            if not all(isinstance(v, dict) for v in values):
                raise SweepError("axis size: each rung must be a mapping of config fields")
            fields = {k for v in values for k in v}
        elif axis == "variant":
            fields = _variant_fields(values)
        elif axis in ("granularity", "tokens"):
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 1 for v in values):
                raise SweepError(f"axis {axis}: values must be numbers >= 1, got {values}")
            fields = set()
        else:
            fields = {axis}
        bad = sorted(f for f in fields if f not in known)
        if bad:
            raise SweepError(f"axis {axis}: {bad[0]} is not a config field (see `sparse-train config --fields`)")
    spec.base_config()  # the base recipe and the `set` overrides must load


def _variant_fields(values: list[Any]) -> set[str]:
    """The config fields a `variant` axis sets; each variant a mapping with a unique string name."""
    if not all(isinstance(v, dict) and isinstance(v.get("name"), str) and v["name"] for v in values):
        raise SweepError(
            "axis variant: each variant must be a mapping with a name, e.g. {name: sinkhorn, router.type: sinkhorn}"
        )
    names = [v["name"] for v in values]
    if len(set(names)) != len(names):
        raise SweepError(f"axis variant: names must be unique, got {names}")
    return {k for v in values for k in v if k != "name"}


def expand(spec: SweepSpec) -> list[Point]:
    """Every point of the spec (grid or list) times its seeds, duplicates dropped, in order."""
    names = list(spec.axes)
    if spec.points == "grid":
        combos = [dict(zip(names, values, strict=True)) for values in itertools.product(*spec.axes.values())]
    elif isinstance(spec.points, list) and all(isinstance(p, dict) for p in spec.points):
        combos = []
        for p in spec.points:
            missing = [n for n in names if n not in p and len(spec.axes[n]) != 1]
            if missing or set(p) - set(names):
                raise SweepError(f"point {p}: give a value for every axis with several values ({names})")
            combos.append({n: p.get(n, spec.axes[n][0]) for n in names})
    else:
        raise SweepError("points must be grid or a list of {axis: value} mappings")
    seen, points = set(), []
    for combo in combos:
        overrides = _overrides(combo, spec)
        values = {axis: (v if _applies(axis, overrides) else None) for axis, v in combo.items()}
        for seed in spec.seeds:
            point = Point(values, {**overrides, "train.seed": seed}, seed)
            if point.trial_id not in seen:
                seen.add(point.trial_id)
                points.append(point)
    return points


def _applies(axis: str, overrides: dict[str, Any]) -> bool:
    """Whether an axis changed this point (a dense point has no granularity, a MoE none of fff.*)."""
    if axis in ("size", "variant", "tokens"):
        return True
    return ("moe.expert_hidden" if axis == "granularity" else axis) in overrides


def _overrides(combo: dict[str, Any], spec: SweepSpec) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for axis, value in combo.items():
        if axis == "size":
            out.update(value)
        elif axis == "variant":
            out.update({k: v for k, v in value.items() if k != "name"})
        elif axis not in ("granularity", "tokens"):
            out[axis] = value
    base = spec.base_config(Point(combo, out, 0).set_args())
    if "tokens" in combo:
        per_step = base.train.batch_size * base.train.grad_accum * base.data.seq_len
        out["train.steps"] = -(-int(combo["tokens"]) // per_step)
    if base.model.ffn != "fff":
        out = {k: v for k, v in out.items() if not k.startswith("fff.")}
    if base.model.ffn != "moe":  # dense and FFF models: the MoE axes do not apply
        return {k: v for k, v in out.items() if not k.startswith(MOE_ONLY)}
    if "granularity" in combo:
        g = int(combo["granularity"])
        if g < 1 or base.model.ffn_hidden % g:
            raise SweepError(f"granularity {g} must divide model.ffn_hidden ({base.model.ffn_hidden})")
        out["moe.expert_hidden"] = base.model.ffn_hidden // g
        out["router.top_k"] = g
    return out
