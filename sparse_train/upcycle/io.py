"""Where conversions read from and write to: HF directories and native checkpoints.

A source is a local HF directory (config.json) or a sparse_train checkpoint / run directory.
Outputs are written into a hidden temporary directory beside the target and renamed into
place only when complete, so an interrupted conversion never leaves a half-written model.
A native output is a run directory whose `checkpoints/step_00000000` holds the model (eval,
generate and `train --init-from` read it).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from sparse_train.config import Config, ConfigError, config_from_dict
from sparse_train.train import checkpoint as ckpt
from sparse_train.upcycle import hf


@dataclass
class Source:
    cfg: Config
    state: dict[str, torch.Tensor]
    tokenizer_dir: Path | None  # an HF source's directory when it has tokenizer files


def load_source(path: Path) -> Source:
    path = Path(path)
    if not path.exists():
        raise ConfigError("--from", f"no such directory: {path}")
    if (path / "config.json").is_file():
        checkpoint = hf.read_hf(path)
        cfg = hf.native_config(checkpoint)
        has_tokenizer = any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model"))
        return Source(cfg, hf.to_native(checkpoint, cfg), path if has_tokenizer else None)
    try:
        resolved = ckpt.resolve_checkpoint_path(path, warn=lambda msg: None)
    except (ckpt.CheckpointError, FileNotFoundError) as err:
        raise ConfigError(
            "--from", f"{path} is neither an HF directory (config.json) nor a checkpoint: {err}"
        ) from None
    cfg = config_from_dict(yaml.safe_load(ckpt.read_checkpoint_config(resolved)))
    return Source(cfg, ckpt.read_weights(resolved), None)


def prepare_target(target: Path, overwrite: bool) -> Path:
    """A fresh temporary directory beside `target` (which must not exist unless `overwrite`)."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise ConfigError("--to", f"{target} exists; pass --overwrite to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def publish(tmp: Path, target: Path) -> None:
    """Replace `target` by the completed `tmp` (the old target is removed only after)."""
    if target.exists():
        stale = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, stale)
        os.replace(tmp, target)
        shutil.rmtree(stale)
    else:
        os.replace(tmp, target)


def write_model(target: Path, cfg: Config, state: dict[str, torch.Tensor], fmt: str, *, overwrite: bool,
                tokenizer_dir: Path | None = None) -> str:  # fmt: skip
    """Write the model as an HF directory or a native run directory; returns what was written."""
    tmp = prepare_target(target, overwrite)
    try:
        if fmt == "hf":
            what = hf.write_hf(tmp, state, cfg, tokenizer_from=tokenizer_dir)
        elif fmt == "native":
            ckpt.save_checkpoint(tmp / "checkpoints", 0, state, {}, {"step": 0}, cfg.to_yaml(), keep=1)
            what = "sparse_train checkpoint"
        else:
            raise ConfigError("--format", f"unknown format {fmt!r}; allowed: hf, native")
        publish(tmp, Path(target))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return what
