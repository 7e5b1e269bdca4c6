"""Single-process checkpoints: atomic writes, a checksummed manifest, auto-resume with fallback.

A checkpoint is a directory `RUN_DIR/checkpoints/step_XXXXXXXX/`:

    model.safetensors   model weights
    optimizer.pt        optimizer state
    state.pt            step, scheduler, sampler position, RNG states, counters
    config.yaml         the resolved config of the run
    manifest.json       format, step, and size + sha256 of every other file; written last

It is written under a temporary name, every file fsync'd, the manifest written last, then the
directory renamed into place (and the parent fsync'd). A crash at any point leaves either no
new checkpoint or a complete one, and the previous checkpoints untouched. Loading verifies
sizes and checksums, so truncation or bit rot is reported instead of silently loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupted or incompatible; one-line message."""


@dataclass
class CheckpointInfo:
    path: Path
    step: int


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    checkpoints_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    config_yaml: str,
    *,
    keep: int,
    before_rename: Callable[[Path], None] | None = None,
) -> Path:
    """Write a complete checkpoint atomically, then delete all but the newest `keep`."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise CheckpointError(f"refusing to save step {step}: parameter {name} is not finite")
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / step_dir_name(step)
    tmp = checkpoints_dir / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(state, tmp / "state.pt")
    (tmp / "config.yaml").write_text(config_yaml)
    files = {}
    for f in sorted(tmp.iterdir()):
        _fsync_path(f)
        files[f.name] = {"bytes": f.stat().st_size, "sha256": _sha256(f)}
    manifest = {"format": FORMAT_VERSION, "step": step, "created": time.time(), "files": files}
    with (tmp / MANIFEST).open("w") as fh:
        json.dump(manifest, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_path(tmp)
    if before_rename is not None:  # a test hook: simulate a crash between write and publish
        before_rename(tmp)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace the old copy last
        stale = checkpoints_dir / f".{final.name}.old-{os.getpid()}"
        os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale)
    else:
        os.replace(tmp, final)
    _fsync_path(checkpoints_dir)
    prune_checkpoints(checkpoints_dir, keep)
    return final


def list_checkpoints(checkpoints_dir: Path) -> list[CheckpointInfo]:
    """Published checkpoint directories, newest first (complete or not: see verify_checkpoint)."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for p in checkpoints_dir.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append(CheckpointInfo(p, int(m.group(1))))
    return sorted(found, key=lambda c: c.step, reverse=True)


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Return the manifest, or raise CheckpointError saying what is wrong with the checkpoint."""
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: incomplete (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{path}: {MANIFEST} is unreadable") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r}, this version reads {FORMAT_VERSION}")
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: missing {name}")
        if f.stat().st_size != meta["bytes"]:
            raise CheckpointError(f"{path}: {name} is truncated ({f.stat().st_size} of {meta['bytes']} bytes)")
        if _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"{path}: {name} is corrupted (checksum mismatch)")
    return manifest


def latest_valid_checkpoint(checkpoints_dir: Path, warn: Callable[[str], None]) -> Path | None:
    """The newest checkpoint that verifies; broken newer ones are reported and skipped.

    Raises if checkpoints exist but none verifies: starting over would silently discard them.
    """
    candidates = list_checkpoints(checkpoints_dir)
    for info in candidates:
        try:
            verify_checkpoint(info.path)
            return info.path
        except CheckpointError as err:
            warn(f"skipping checkpoint: {err}")
    if candidates:
        raise CheckpointError(f"{checkpoints_dir}: no checkpoint verifies ({len(candidates)} found, all broken)")
    return None


def prune_checkpoints(checkpoints_dir: Path, keep: int) -> None:
    """Delete complete checkpoints beyond the newest `keep`, and leftovers of interrupted saves."""
    for leftover in checkpoints_dir.glob(".step_*.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    complete = [c for c in list_checkpoints(checkpoints_dir) if (c.path / MANIFEST).is_file()]
    for info in complete[keep:]:
        shutil.rmtree(info.path)


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Verify, then load weights (and optimizer state); return the trainer state dict."""
    verify_checkpoint(path)
    device = next(model.parameters()).device
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False, device=str(device))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the model "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    return torch.load(path / "state.pt", weights_only=True)


def read_checkpoint_config(path: Path) -> str:
    verify_checkpoint(path)
    return (path / "config.yaml").read_text()


def resolve_checkpoint_path(path: Path, warn: Callable[[str], None]) -> Path:
    """Accept a checkpoint directory, a run's checkpoints/ directory, or a run directory."""
    if (path / MANIFEST).exists() or _STEP_DIR.match(path.name):
        return path
    for candidate in (path / "checkpoints", path):
        if list_checkpoints(candidate):
            found = latest_valid_checkpoint(candidate, warn)
            if found is not None:
                return found
    raise CheckpointError(f"{path}: no checkpoint here (expected a step_XXXXXXXX directory or a run directory)")
