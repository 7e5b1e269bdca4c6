"""Checkpoints: sharded writes from any layout, atomic publication, verified reads, auto-resume.

A checkpoint is a directory `RUN_DIR/checkpoints/step_XXXXXXXX/`:

    model/              the weights, torch.distributed.checkpoint (DCP) shards of every rank
    optim/              the optimizer state, DCP shards (sparse_train.train.sharded)
    state.pt            step, scheduler, sampler position, RNG states, counters
    config.yaml         the resolved config of the run
    layout.json         the parallel layout and world size that wrote it
    manifest.json       format, step, and size + sha256 of every other file; written last

Every rank writes its shards into one hidden temporary directory (on a filesystem all ranks
share); after all have finished, the main rank writes the rest, fsyncs every file, writes the
manifest last and renames the directory into place. A crash or kill at any point leaves either
no new checkpoint or a complete one, the previous checkpoints untouched, and `--resume auto`
skips anything without a verifying manifest. Loading verifies sizes and checksums, so
truncation or bit rot is reported instead of silently loaded, and reshards into the loading
layout. Format 1 checkpoints (whole tensors in model.safetensors, optimizer.pt), written
before sharded checkpoints, still load everywhere.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from sparse_train.errors import CheckpointError
from sparse_train.train import sharded

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
MANIFEST = "manifest.json"
LAYOUT = "layout.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


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


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, *, full: bool = False) -> dict[str, Any]:
    """The optimizer state keyed by parameter name, so any layout can read it back.

    `full` gathers sharded (DTensor) states into whole tensors: a collective on every rank.
    """
    options = StateDictOptions(full_state_dict=full)
    return get_optimizer_state_dict(model, optimizer, options=options)


def save_checkpoint(
    checkpoints_dir: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    optim_state: dict[str, Any] | None,
    state: dict[str, Any],
    config_yaml: str,
    *,
    keep: int,
    layout: dict[str, Any] | None = None,
    distributed: bool = False,
    is_main: bool = True,
    after_shards: Callable[[], None] | None = None,
    before_rename: Callable[[Path], None] | None = None,
) -> Path | None:
    """Write a complete checkpoint atomically, then delete all but the newest `keep`.

    `weights` / `optim_state` hold this rank's part (DTensor shards, a pipeline stage's
    tensors; `sharded.model_state` / `sharded.optimizer_state`). When `distributed`, every rank
    calls this (collective); the main rank publishes and returns the path, the others None."""
    bad = sharded.local_non_finite(weights)
    if distributed:
        flag = torch.tensor([int(bad is not None)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and bad is None:
            bad = "(on another rank)"
    if bad is not None:
        raise CheckpointError(f"refusing to save step {step}: parameter {bad} is not finite")
    final = checkpoints_dir / step_dir_name(step)
    tmp = checkpoints_dir / f".{final.name}.tmp"
    if is_main:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a save that was killed
            shutil.rmtree(tmp)
        tmp.mkdir()
    if distributed:
        dist.barrier()
    sharded.save(tmp, weights, optim_state, distributed)
    if after_shards is not None:  # a test hook: a rank dying before the checkpoint is published
        after_shards()
    if distributed:
        dist.barrier()  # every rank's shards are on disk
    if not is_main:
        return None
    torch.save(state, tmp / "state.pt")
    (tmp / "config.yaml").write_text(config_yaml)
    (tmp / LAYOUT).write_text(json.dumps(layout or {"world_size": 1}, indent=1) + "\n")
    files = {}
    for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
        _fsync_path(f)
        files[str(f.relative_to(tmp))] = {"bytes": f.stat().st_size, "sha256": _sha256(f)}
    for d in sorted(p for p in tmp.rglob("*") if p.is_dir()):
        _fsync_path(d)
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


def checkpoint_format(path: Path) -> int:
    return int(json.loads((path / MANIFEST).read_text())["format"])


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
    if manifest.get("format") not in READABLE_FORMATS:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r}, this version reads {READABLE_FORMATS}")
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
    for leftover in checkpoints_dir.glob(".step_*.tmp*"):
        shutil.rmtree(leftover, ignore_errors=True)
    complete = [c for c in list_checkpoints(checkpoints_dir) if (c.path / MANIFEST).is_file()]
    for info in complete[keep:]:
        shutil.rmtree(info.path)


# Parameters whose stored shape changed without changing their elements' order; older
# checkpoints hold them in the previous shape and are reshaped on load.
#   w_gate_up_ED2F: [E, D, 2F] before the parallel issue, [E, D, 2, F] since (decision 6)
RESHAPED_ON_LOAD = ("w_gate_up_ED2F",)


def _fit_shape(name: str, stored: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if stored.shape != target.shape and name.endswith(RESHAPED_ON_LOAD) and stored.numel() == target.numel():
        return stored.reshape(target.shape)
    return stored


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The whole model's weights as CPU tensors, whatever layout wrote them."""
    if checkpoint_format(path) == 1:
        return load_file(str(path / "model.safetensors"))
    return sharded.read_full(path)


def fit_weights(
    path: Path, stored: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """`stored` checked against the names and shapes of `targets` (one model or one pipeline
    stage's part of it), reshaped where an older layout differs only in shape; tied weights
    may be stored under either of their names."""
    stored = {k: _fit_shape(k, v, targets[k]) if k in targets else v for k, v in stored.items()}
    aliases: dict[int, list[str]] = {}
    for name, t in targets.items():
        aliases.setdefault(id(t), []).append(name)
    missing = {m for m in targets if m not in stored and not any(a in stored for a in aliases[id(targets[m])])}
    if missing:
        raise CheckpointError(f"{path}: weights do not match the model (missing {sorted(missing)[:3]})")
    for name, t in targets.items():
        value = stored.get(name)
        if value is None:
            value = next(stored[a] for a in aliases[id(t)] if a in stored)
        if tuple(value.shape) != tuple(t.shape):
            raise CheckpointError(f"{path}: {name} has shape {tuple(value.shape)}, the model {tuple(t.shape)}")
        stored[name] = value
    return {name: stored[name] for name in targets}


def load_weights(path: Path, model: nn.Module) -> None:
    """Load a checkpoint's weights into a single-process model, exactly (no unexpected names)."""
    stored = read_weights(path)
    targets = model.state_dict(keep_vars=True)
    unexpected = sorted(set(stored) - set(targets))
    if unexpected:
        raise CheckpointError(f"{path}: weights do not match the model (unexpected {unexpected[:3]})")
    model.load_state_dict(fit_weights(path, stored, targets))


def read_optimizer_state(path: Path) -> dict[str, Any]:
    return torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)


def _fit_optimizer_state(state: dict[str, Any], named: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Reshape moment tensors saved in an older parameter shape (see RESHAPED_ON_LOAD)."""
    for key, per_param in state["state"].items():
        target = named.get(key) if isinstance(key, str) else None
        if target is None:
            continue
        for k, v in per_param.items():
            if isinstance(v, torch.Tensor) and v.dim() and v.shape != target.shape and v.numel() == target.numel():
                per_param[k] = v.reshape(target.shape)
    return state


def load_optimizer_state(
    path: Path, saved: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, *, full: bool = False
) -> None:
    """Restore a name-keyed optimizer state into `optimizer` over `model` (its part of it, if sharded)."""
    if any(isinstance(k, int) for k in saved["state"]):  # checkpoints before name-keyed states
        params = [p for group in optimizer.param_groups for p in group["params"]]
        named = {i: p for i, p in enumerate(params)}
        for i, per_param in saved["state"].items():
            for k, v in per_param.items():
                if isinstance(v, torch.Tensor) and v.dim() and v.shape != named[i].shape:
                    per_param[k] = v.reshape(named[i].shape)
        optimizer.load_state_dict(saved)
        return
    named = dict(model.named_parameters())
    saved = _fit_optimizer_state(saved, named)
    mine = {k: v for k, v in saved["state"].items() if k in named}
    groups = [{**g, "params": [n for n in g["params"] if n in named]} for g in saved["param_groups"]]
    try:
        set_optimizer_state_dict(
            model, optimizer, {"state": mine, "param_groups": groups}, options=StateDictOptions(full_state_dict=full)
        )
    except (KeyError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{path}: optimizer state does not match the model ({err})") from None


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Verify, then load weights (and optimizer state) into a single-process model; return the trainer state."""
    verify_checkpoint(path)
    if checkpoint_format(path) == 1:
        load_weights(path, model)
        if optimizer is not None:
            load_optimizer_state(path, read_optimizer_state(path), model, optimizer)
    else:
        load_sharded(path, model, optimizer, distributed=False)
    return read_trainer_state(path)


def load_sharded(
    path: Path, module: nn.Module, optimizer: torch.optim.Optimizer | None, *, distributed: bool, partial: bool = False
) -> None:
    """A format-2 checkpoint's weights (and optimizer state) into this rank's part of the model."""
    try:
        sharded.load_model(path, module, distributed, partial=partial)
        if optimizer is not None:
            sharded.load_optimizer(path, module, optimizer, distributed)
    except sharded.ShapeMismatch as err:
        raise CheckpointError(f"{path}: {err}") from None


def read_trainer_state(path: Path) -> dict[str, Any]:
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


# ---- inspection and conversion (`sparse-train ckpt info | convert`) ---------------------------
def describe(path: Path) -> dict[str, Any]:
    """What a checkpoint holds: format, step, the layout that wrote it, and every weight tensor."""
    import yaml

    manifest = verify_checkpoint(path)
    fmt = int(manifest["format"])
    if fmt == 1:
        from safetensors import safe_open

        with safe_open(str(path / "model.safetensors"), framework="pt") as fh:
            tensors = {
                k: (
                    tuple(fh.get_slice(k).get_shape()),
                    _SAFETENSORS_DTYPES.get(fh.get_slice(k).get_dtype(), fh.get_slice(k).get_dtype()),
                )
                for k in fh.keys()
            }
        layout: dict[str, Any] = {"world_size": 1, "note": "format 1: whole tensors written by the main rank"}
    else:
        tensors = {
            k: (shape, str(dtype).replace("torch.", "")) for k, (shape, dtype) in sharded.stored_tensors(path).items()
        }
        layout = json.loads((path / LAYOUT).read_text())
    config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    model = config.get("model", {})
    return {
        "path": str(path),
        "format": fmt,
        "step": manifest["step"],
        "created": manifest.get("created"),
        "layout": layout,
        "model": {k: model.get(k) for k in ("ffn", "d_model", "n_layers", "vocab_size")},
        "parameters": sum(math.prod(shape) for shape, _ in tensors.values()),
        "bytes_on_disk": sum(meta["bytes"] for meta in manifest["files"].values()),
        "tensors": {k: f"{dtype}{list(shape)}" for k, (shape, dtype) in sorted(tensors.items())},
    }


_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64"}


def consolidate(path: Path, out: Path, *, overwrite: bool = False) -> Path:
    """The whole model's weights of a checkpoint (any layout, any format) as one safetensors file,
    written under a temporary name and renamed when complete."""
    from safetensors.torch import save_file

    verify_checkpoint(path)
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} exists; pass --overwrite to replace it")
    weights = {k: v.contiguous() for k, v in read_weights(path).items()}
    step = str(read_trainer_state(path).get("step", ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        metadata = {
            "format": "pt",
            "sparse_train_step": step,
            "sparse_train_config": (path / "config.yaml").read_text(),
        }
        save_file(_distinct_storage(weights), str(tmp), metadata=metadata)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def _distinct_storage(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied weights read from format 1): copy the later ones."""
    seen: set[int] = set()
    out = {}
    for name, t in weights.items():
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out
