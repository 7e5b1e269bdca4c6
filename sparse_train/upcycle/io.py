"""Where conversions read from and write to: HF directories and native checkpoints.

A source is a local HF directory (config.json) or a sparse_train checkpoint / run directory.
Outputs are written into a hidden temporary directory beside the target and published
(sparse_train.atomic) only when complete, so an interrupted conversion never leaves a
half-written model.
A native output is a run directory whose `checkpoints/step_00000000` holds the model (eval,
generate and `train --init-from` read it).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from sparse_train import atomic
from sparse_train.config import Config, ConfigError, compose_config
from sparse_train.data.tokenizer import HFTokenizer, Tokenizer, build_tokenizer
from sparse_train.lazy import ReadWhole, read_all
from sparse_train.train import checkpoint as ckpt
from sparse_train.train.weights import CheckpointWeights, TensorWeights, WeightSource
from sparse_train.upcycle import hf


@dataclass
class Source:
    """A model to read: its config and its weights, by reference until they are read."""

    cfg: Config
    weights: WeightSource  # read by slice, into a model already split and sharded (`train --init-from`)
    tokenizer_dir: Path | None  # where the source's HF tokenizer files are, if it has them
    is_hf: bool = False

    @functools.cached_property
    def state(self) -> dict[str, torch.Tensor]:
        """Every tensor, whole, in this process, kept (tools that need the whole model at once;
        conversions go through `weights.tensors`, read one block at a time)."""
        if isinstance(self.weights, CheckpointWeights):
            return ckpt.read_weights(self.weights.path)
        return read_all(self.weights.tensors)

    def tokenizer(self) -> Tokenizer | None:
        """The tokenizer the source was trained with; None for an HF directory without one."""
        if self.tokenizer_dir is not None:
            return HFTokenizer(self.tokenizer_dir)
        return None if self.is_hf else build_tokenizer(self.cfg.data)


def load_source(path: Path) -> Source:
    path = Path(path)
    if not path.exists():
        raise ConfigError("--from", f"no such directory: {path}")
    if (path / "config.json").is_file():
        checkpoint = hf.read_hf(path)
        cfg = hf.native_config(checkpoint)
        if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
            return Source(cfg, TensorWeights(hf.to_native(checkpoint, cfg)), None, is_hf=True)
        cfg = _with_tokenizer(cfg, path.resolve())
        return Source(cfg, TensorWeights(hf.to_native(checkpoint, cfg)), path.resolve(), is_hf=True)
    try:
        resolved = ckpt.resolve_checkpoint_path(path, warn=lambda msg: None)
    except (ckpt.CheckpointError, FileNotFoundError) as err:
        raise ConfigError(
            "--from", f"{path} is neither an HF directory (config.json) nor a checkpoint: {err}"
        ) from None
    cfg = compose_config(yaml.safe_load(ckpt.read_checkpoint_config(resolved)))
    tokenizer_dir = Path(cfg.data.tokenizer_path).expanduser() if cfg.data.tokenizer == "hf" else None
    return Source(cfg, CheckpointWeights(resolved), tokenizer_dir)


def _with_tokenizer(cfg: Config, tokenizer_dir: Path) -> Config:
    data = cfg.to_dict()
    data["data"].update(tokenizer="hf", tokenizer_path=str(tokenizer_dir))
    return compose_config(data)


def check_target(target: Path, overwrite: bool) -> Path:
    target = Path(target)
    if target.exists() and not overwrite:
        raise ConfigError("--to", f"{target} exists; pass --overwrite to replace it")
    return target


def write_model(
    target: Path,
    cfg: Config,
    state: Mapping[str, torch.Tensor],
    fmt: str,
    *,
    overwrite: bool,
    tokenizer_dir: Path | None = None,
    extra_files: dict[str, str] | None = None,
) -> str:
    """Write the model as an HF directory or a native run directory, with `extra_files` (name ->
    text) beside it; returns what was written. `state`'s tensors may be lazy: each is read when
    written."""
    state = ReadWhole(state)
    target = check_target(target, overwrite)
    with atomic.writing(target) as tmp:  # a directory, created by the writers below
        if fmt == "hf":
            what = hf.write_hf(tmp, state, cfg, tokenizer_from=tokenizer_dir)
        elif fmt == "native":
            config = cfg.to_dict()
            if tokenizer_dir is not None:  # the run carries its tokenizer, so it never depends on the source
                hf.copy_tokenizer(tokenizer_dir, tmp / "tokenizer")
                config["data"].update(tokenizer="hf", tokenizer_path=str(target.resolve() / "tokenizer"))
            config_yaml = yaml.safe_dump(config, sort_keys=False)
            # DCP writes one state dict: the whole model in memory here (HF output goes block by block)
            ckpt.save_checkpoint(tmp / "checkpoints", 0, dict(state), {}, {"step": 0}, config_yaml, keep=1)
            what = "sparse_train checkpoint"
        else:
            raise ConfigError("--format", f"unknown format {fmt!r}; allowed: hf, native")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return what
