"""Checkpoints: sharded writes from any layout, atomic publication, verified reads, auto-resume.

A checkpoint is a directory `RUN_DIR/checkpoints/step_XXXXXXXX/`:

    model/              the weights, torch.distributed.checkpoint (DCP) shards of every rank
    optim/              the optimizer state, DCP shards (sparse_train.train.sharded)
    state.pt            step, scheduler, sampler position, RNG states, counters
    config.yaml         the resolved config of the run
    layout.json         the parallel layout and world size that wrote it
    manifest.json       format, step, and size + sha256 of every other file; written last

Every rank writes its shards into one hidden temporary directory (on a filesystem all ranks
share); after all have finished, the main rank writes the rest, the manifest last, and
publishes the directory (sparse_train.atomic: fsync, one rename). A crash or kill at any point
leaves either no new checkpoint or a complete one, the previous checkpoints untouched, and
`--resume auto` skips anything without a verifying manifest. Saving a step that already has a
checkpoint (a run resumed from an older one reaches it again) publishes the new copy under a
fresh name `step_XXXXXXXX.rN` that ranks above the old copy before the old copy is deleted
(see _publish_step). With checkpoint.async_save the shards are written in the background
(start_checkpoint) and the same publication follows once every rank's files are on disk.
Loading verifies sizes and checksums, so truncation or bit rot is reported instead of silently
loaded (a resume hashes each rank's share with the load's own reads: load_verified), and
reshards into the loading layout.

Formats: 3 names parameters without shape suffixes (`w_down`); 2, the first sharded format,
named them with (`w_down_EFD`) and still loads, its names converted on read
(sharded.current_name). Format 1 (whole tensors in model.safetensors) is no longer read:
nothing has written it since sharded checkpoints.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import shutil
import time
from collections.abc import Callable, Collection
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
)

from sparse_train import atomic
from sparse_train.errors import CheckpointError
from sparse_train.lazy import write_safetensors
from sparse_train.train import faults, sharded

FORMAT_VERSION = 3
READABLE_FORMATS = (2, 3)  # 2: parameter names with shape suffixes, converted on read
MANIFEST = "manifest.json"
LAYOUT = "layout.json"
_STEP_DIR = re.compile(r"^step_(\d{8})(?:\.r(\d+))?$")  # .rN: a re-saved step, see _publish_step


@dataclass
class CheckpointInfo:
    path: Path
    step: int
    revision: int = 0  # > 0: a re-save of the step not yet renamed to the plain name


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
) -> Path | None:
    """Write a complete checkpoint atomically, then delete all but the newest `keep`.

    `weights` / `optim_state` hold this rank's part (DTensor shards, a pipeline stage's
    tensors; `sharded.model_state` / `sharded.optimizer_state`). When `distributed`, every rank
    calls this (collective); the main rank publishes and returns the path, the others None."""
    tmp = _begin_save(checkpoints_dir, step, weights, distributed, is_main)
    side = _side_files(state, config_yaml, layout)
    # Each rank checksums the files it writes as it writes them; no rank reads back another's.
    written = sharded.save(tmp, weights, optim_state, distributed)
    return _finish_save(tmp, checkpoints_dir, step, written, side, keep, distributed, is_main, group=None)


@dataclass
class PendingSave:
    """A checkpoint being written in the background (start_checkpoint); `wait` returns what
    save_checkpoint would have: the published path on the main rank, None on the others."""

    step: int
    path: Path  # where it is published once complete
    future: futures.Future

    def wait(self) -> Path | None:
        return self.future.result()


def checkpoint_groups(distributed: bool) -> tuple[Any, Any] | None:
    """The process groups of asynchronous saves, one per DCP directory: gloo (DCP's background
    writer needs a CPU backend) and used by nothing else, so a save's collectives never
    interleave with the training loop's. A collective: every rank creates them, once."""
    return (dist.new_group(backend="gloo"), dist.new_group(backend="gloo")) if distributed else None


def start_checkpoint(
    checkpoints_dir: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    optim_state: dict[str, Any] | None,
    state: dict[str, Any],
    config_yaml: str,
    *,
    keep: int,
    groups: tuple[Any, Any] | None,
    layout: dict[str, Any] | None = None,
    distributed: bool = False,
    is_main: bool = True,
) -> PendingSave:
    """save_checkpoint, asynchronously: returns once this rank's state is copied (DCP's staging)
    and its trainer state serialised; the shards are written by DCP's async_save, then a
    background thread gathers the digests and publishes (manifest last, one rename) as soon as
    every rank's files are on disk. Until then the previous checkpoints are the newest; a crash
    leaves them intact. `groups`: checkpoint_groups(), used only by this save's collectives.
    Wait for a pending save before starting the next one."""
    tmp = _begin_save(checkpoints_dir, step, weights, distributed, is_main)
    side = _side_files(state, config_yaml, layout)  # the state of this step, not of when it is written
    shards = sharded.save_async(tmp, weights, optim_state, distributed, groups)
    group = groups[0] if groups else None  # free again once the model's shards are written

    def finish() -> Path | None:
        return _finish_save(tmp, checkpoints_dir, step, shards.result(), side, keep, distributed, is_main, group)

    executor = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-publish")
    future = executor.submit(finish)
    executor.shutdown(wait=False)  # the thread ends with `finish`
    return PendingSave(step, checkpoints_dir / step_dir_name(step), future)


def _begin_save(checkpoints_dir: Path, step: int, weights: dict[str, Any], distributed: bool, is_main: bool) -> Path:
    """Refuse non-finite weights (on any rank), then create the step's temporary directory,
    which every rank writes its shards into; returns it (a collective when distributed)."""
    bad = sharded.local_non_finite(weights)
    if distributed:
        # on the training device: NCCL serves device tensors only
        device = next((t.device for t in weights.values() if isinstance(t, torch.Tensor)), torch.device("cpu"))
        all_finite = torch.tensor([int(bad is None)], device=device)  # 1 = good, as every agreement flag
        dist.all_reduce(all_finite, op=dist.ReduceOp.MIN)
        if not all_finite.item() and bad is None:
            bad = "(on another rank)"
    if bad is not None:
        raise CheckpointError(f"refusing to save step {step}: parameter {bad} is not finite")
    # One name every rank agrees on (not atomic.temporary_path, which is per process).
    tmp = checkpoints_dir / f".{step_dir_name(step)}.tmp"
    if is_main:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        atomic.remove(tmp)  # left by a save that was killed
        tmp.mkdir()
    if distributed:
        dist.barrier()
    return tmp


def _side_files(state: dict[str, Any], config_yaml: str, layout: dict[str, Any] | None) -> dict[str, bytes]:
    """The main rank's small files, serialised now (an asynchronous save must record the step's
    state, not the one training has reached when the shards are on disk)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    layout_json = json.dumps(layout or {"world_size": 1}, indent=1) + "\n"
    return {"state.pt": buffer.getvalue(), "config.yaml": config_yaml.encode(), LAYOUT: layout_json.encode()}


def _finish_save(
    tmp: Path,
    checkpoints_dir: Path,
    step: int,
    shard_digests: sharded.FileDigests,
    side: dict[str, bytes],
    keep: int,
    distributed: bool,
    is_main: bool,
    group: Any,
) -> Path | None:
    """Once this rank's shards are written: gather every rank's digests on the main rank (the
    barrier after which all shards are on disk), which writes its small files and the manifest
    and publishes. `group`: the process group of these collectives (None: the default)."""
    rank = dist.get_rank() if distributed else 0
    written = {name: {**meta, "rank": rank} for name, meta in shard_digests.items()}
    faults.fail_point("save", step=step, rank=rank, run_dir=checkpoints_dir.parent)  # SPARSE_TRAIN_FAIL_AT
    if distributed:
        parts: list[Any] | None = [None] * dist.get_world_size() if is_main else None
        dist.gather_object(written, parts, dst=0, group=group)
        for part in parts or []:
            written |= part
    if not is_main:
        return None
    for name, data in side.items():
        (tmp / name).write_bytes(data)
        written[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "rank": rank}
    files = dict(sorted(written.items()))
    manifest = {"format": FORMAT_VERSION, "step": step, "created": time.time(), "files": files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))  # last: its presence means complete
    final = _publish_step(tmp, checkpoints_dir, step)
    prune_checkpoints(checkpoints_dir, keep)
    return final


def _publish_step(tmp: Path, checkpoints_dir: Path, step: int) -> Path:
    """Publish the complete checkpoint `tmp` as the step's directory; return its path.

    A directory cannot replace another in one rename, so when the step already has a
    checkpoint the new copy is first published under a fresh name `step_X.rN`, which
    list_checkpoints ranks above the old copies; then the old copies are deleted and the new
    one takes the plain name. Every move is one atomic rename or the deletion of a superseded
    copy, so a crash at any point leaves the step's newest complete copy the one found.
    """
    final = checkpoints_dir / step_dir_name(step)
    existing = [c for c in list_checkpoints(checkpoints_dir) if c.step == step]
    if not existing:
        atomic.publish(tmp, final)
        return final
    fresh = checkpoints_dir / f"{final.name}.r{max(c.revision for c in existing) + 1}"
    atomic.publish(tmp, fresh)
    for old in existing:
        shutil.rmtree(old.path)
    atomic.publish(fresh, final)
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
            found.append(CheckpointInfo(p, int(m.group(1)), int(m.group(2) or 0)))
    return sorted(found, key=lambda c: (c.step, c.revision), reverse=True)


ALL_FILES = "all"
SIZES_ONLY = "sizes"
SIDE_FILES = "side"  # the files outside the DCP directories: state, config, layout (a few KB)
Checksums = str | int  # ALL_FILES, SIZES_ONLY, SIDE_FILES, or a rank: the files that rank wrote


class CorruptCheckpoint(CheckpointError):
    """A file's contents differ from its manifest entry (or cannot be parsed), found while loading."""


def _is_shard_data(name: str) -> bool:
    """A DCP directory's file other than its index (`.metadata`), which every loading rank reads."""
    top, _, rest = name.partition("/")
    return top in (sharded.MODEL_DIR, sharded.OPTIM_DIR) and rest != sharded.METADATA


def _hashed_here(name: str, meta: dict[str, Any], checksums: Checksums) -> bool:
    """Whether `verify_checkpoint(..., checksums)` hashes the file `name`."""
    if checksums == ALL_FILES:
        return True
    if checksums == SIZES_ONLY:
        return False
    if checksums == SIDE_FILES:
        return "/" not in name
    return meta.get("rank", 0) == checksums  # format 2 recorded no writer: rank 0 hashes those files


def verify_checkpoint(path: Path, checksums: Checksums = ALL_FILES) -> dict[str, Any]:
    """Return the manifest, or raise CheckpointError saying what is wrong with the checkpoint.

    Every file's presence and size are checked; `checksums` says whose contents are hashed:
    every file (ALL_FILES: `ckpt verify`, consolidation), none (SIZES_ONLY), those outside the
    DCP directories (SIDE_FILES: before a load that checksums the rest, see load_verified), or
    those rank N wrote."""
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
        raise CheckpointError(
            f"{path}: format {manifest.get('format')!r}, this version reads formats {list(READABLE_FORMATS)}"
        )
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: missing {name}")
        if f.stat().st_size != meta["bytes"]:
            raise CheckpointError(f"{path}: {name} is truncated ({f.stat().st_size} of {meta['bytes']} bytes)")
    for name, meta in files.items():
        if _hashed_here(name, meta, checksums) and _sha256(path / name) != meta["sha256"]:
            raise CheckpointError(f"{path}: {name} is corrupted (checksum mismatch)")
    return manifest


def latest_valid_checkpoint(
    checkpoints_dir: Path,
    warn: Callable[[str], None],
    *,
    checksums: Checksums = ALL_FILES,
    agree: Callable[[bool], bool] | None = None,
    older_than: Path | None = None,
) -> Path | None:
    """The newest checkpoint that verifies; broken newer ones are reported and skipped.

    With `agree` (every rank calls this, each checking its share), a checkpoint counts only if
    it verified on every rank: `agree(ok)` returns whether all ranks' `ok` were true.
    `older_than`: only those listed after that one (it failed to load).
    Raises if checkpoints exist but none verifies: starting over would silently discard them.
    """
    candidates = list_checkpoints(checkpoints_dir)
    if older_than is not None:
        candidates = candidates[[c.path for c in candidates].index(older_than) + 1 :]
    for info in candidates:
        try:
            verify_checkpoint(info.path, checksums)
            ok = True
        except CheckpointError as err:
            warn(f"skipping checkpoint: {err}")
            ok = False
        if agree is not None and not agree(ok) and ok:
            warn(f"skipping checkpoint: {info.path} did not verify on another rank")
            ok = False
        if ok:
            return info.path
    if candidates:
        raise CheckpointError(f"{checkpoints_dir}: no checkpoint verifies ({len(candidates)} found, all broken)")
    return None


def prune_checkpoints(checkpoints_dir: Path, keep: int) -> None:
    """Delete complete checkpoints beyond the newest `keep` steps, older copies of a re-saved
    step, and leftovers of interrupted saves."""
    for leftover in checkpoints_dir.glob(".step_*"):
        atomic.remove(leftover)
    kept: set[int] = set()
    for info in list_checkpoints(checkpoints_dir):  # newest first: a step's newest copy first
        if not (info.path / MANIFEST).is_file():
            continue
        if info.step in kept or len(kept) >= keep:
            shutil.rmtree(info.path)
        else:
            kept.add(info.step)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The whole model's weights as CPU tensors, whatever layout wrote them."""
    return sharded.read_full(path)


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Verify, then load weights (and optimizer state) into a single-process model; return the
    trainer state. The shards are checksummed by the load's own reads (load_verified)."""
    verify_checkpoint(path, SIDE_FILES)
    load_verified(path, model, optimizer, distributed=False)
    return read_trainer_state(path)


def load_sharded(
    path: Path,
    module: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    *,
    distributed: bool,
    partial: bool = False,
    hashed: Collection[str] = (),
) -> sharded.FileDigests:
    """A checkpoint's weights (and optimizer state) into this rank's part of the model; the
    digests of the DCP indexes and of the files of `hashed`, from the load's own reads."""
    try:
        digests = sharded.load_model(path, module, distributed, partial=partial, hashed=hashed)
        if optimizer is not None:
            digests |= sharded.load_optimizer(path, module, optimizer, distributed, hashed=hashed)
    except sharded.ShapeMismatch as err:
        raise CheckpointError(f"{path}: {err}") from None
    return digests


def shards_to_hash(manifest: dict[str, Any], rank: int, world_size: int) -> list[str]:
    """The DCP shard files a rank of `world_size` checksums while loading: those its writer
    rank wrote (modulo the world size, so that a smaller world still covers every file)."""
    return [
        name
        for name, meta in manifest["files"].items()
        if _is_shard_data(name) and meta.get("rank", 0) % world_size == rank
    ]


def load_verified(
    path: Path,
    module: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    *,
    distributed: bool,
    partial: bool = False,
    rank: int = 0,
    world_size: int = 1,
    agree: Callable[[bool], bool] | None = None,
) -> None:
    """Load a checkpoint whose sizes and side files verified, checksumming the rest on the way.

    Each rank hashes the DCP indexes and its share of the shard files (shards_to_hash) from
    the load's own reads, plus whatever of those files the load skipped; with `agree`, the
    ranks then agree on the verdict. Raises CorruptCheckpoint, on every rank, if any file
    differs from the manifest: the module and optimizer then hold garbage and must be loaded
    again (from an older checkpoint) before training."""
    files = json.loads((path / MANIFEST).read_text())["files"]
    error: str | None = None
    try:
        digests = load_sharded(
            path,
            module,
            optimizer,
            distributed=distributed,
            partial=partial,
            hashed=shards_to_hash({"files": files}, rank, world_size),
        )
        error = _first_mismatch(path, files, digests)
    except CheckpointException as err:  # a record torch.load cannot parse, on any rank (DCP tells all)
        error = f"{path}: unreadable shard ({str(err).splitlines()[0]})"
    if agree is not None and not agree(error is None) and error is None:
        error = f"{path}: corrupted on another rank (see its log)"
    if error is not None:
        raise CorruptCheckpoint(error)


def _first_mismatch(path: Path, files: dict[str, Any], digests: sharded.FileDigests) -> str | None:
    for name, got in sorted(digests.items()):
        want = files.get(name)
        if want is not None and (got["bytes"], got["sha256"]) != (want["bytes"], want["sha256"]):
            return f"{path}: {name} is corrupted (checksum mismatch)"
    return None


def read_trainer_state(path: Path) -> dict[str, Any]:
    return torch.load(path / "state.pt", weights_only=True)


def read_checkpoint_config(path: Path) -> str:
    """The config a checkpoint was trained with (YAML); the caller has verified the checkpoint."""
    return (path / "config.yaml").read_text()


def resolve_checkpoint_path(path: Path, warn: Callable[[str], None]) -> Path:
    """Accept a checkpoint directory, a run's checkpoints/ directory, or a run directory; the
    checkpoint found is verified (every file's checksum)."""
    if _is_checkpoint_dir(path):
        verify_checkpoint(path)
        return path
    for candidate in (path / "checkpoints", path):
        if list_checkpoints(candidate):
            found = latest_valid_checkpoint(candidate, warn)
            if found is not None:
                return found
    raise CheckpointError(f"{path}: no checkpoint here (expected a step_XXXXXXXX directory or a run directory)")


def _is_checkpoint_dir(path: Path) -> bool:
    return (path / MANIFEST).exists() or bool(_STEP_DIR.match(path.name))


def checkpoints_in(path: Path) -> list[Path]:
    """A checkpoint directory itself, or every checkpoint of a run (or its checkpoints/ directory), newest first."""
    if _is_checkpoint_dir(path):
        return [path]
    for candidate in (path / "checkpoints", path):
        found = list_checkpoints(candidate)
        if found:
            return [info.path for info in found]
    raise CheckpointError(f"{path}: no checkpoint here (expected a step_XXXXXXXX directory or a run directory)")


def verify_report(path: Path) -> dict[str, Any]:
    """`ckpt verify`: every file of one checkpoint checked against its manifest, as a JSON-able record."""
    try:
        manifest = verify_checkpoint(path)
    except CheckpointError as err:
        return {"path": str(path), "ok": False, "error": str(err)}
    files = manifest["files"].values()
    return {
        "path": str(path),
        "ok": True,
        "step": manifest["step"],
        "files": len(files),
        "bytes": sum(m["bytes"] for m in files),
    }


# ---- inspection and conversion (`sparse-train ckpt info | convert`) ---------------------------
def describe(path: Path) -> dict[str, Any]:
    """What a checkpoint holds: format, step, the layout that wrote it, and every weight tensor."""
    import yaml

    manifest = verify_checkpoint(path)
    fmt = int(manifest["format"])
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


def consolidate(path: Path, out: Path, *, overwrite: bool = False) -> Path:
    """The whole model's weights of a checkpoint (any layout, any readable format) as one
    safetensors file, published atomically when complete. Written one tensor at a time (each
    read through DCP just before its bytes go out), so the model is never whole in memory."""
    verify_checkpoint(path)
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} exists; pass --overwrite to replace it")
    step = str(read_trainer_state(path).get("step", ""))
    metadata = {"format": "pt", "sparse_train_step": step, "sparse_train_config": (path / "config.yaml").read_text()}
    shapes = sharded.stored_tensors(path)
    with atomic.writing(out) as tmp:
        write_safetensors(tmp, shapes, lambda name: sharded.read_tensor(path, name), metadata)
    return out
