"""Sharded checkpoint payloads: the model and optimizer state through torch.distributed.checkpoint.

Every rank writes only the shards it holds (FSDP2 / EP / TP DTensor pieces, its pipeline
stage's blocks) into `model/` and `optim/` DCP directories; replicated tensors are written
once. A checkpoint records global tensor shapes, so it loads into any other layout: DCP reads
each rank's new shards from whatever pieces were written, which is what reshards expert
weights and FFF leaves from ep=2 to ep=4, to ep=1, or into one process. The optimizer state is
flattened per parameter (`state.<fqn>.<key>`, `param_groups.<fqn>.<key>`), so pipeline stages,
which hold disjoint parameters and param groups, save and load it independently.

Names are those of the single-device model everywhere. Checkpoints of format 2 named some
parameters with shape suffixes (`experts.w_down_EFD`); `current_name` converts them on read,
for the model and the optimizer state alike, so they load as any other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import pickle
import warnings
from collections.abc import Collection, Iterator
from concurrent import futures
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.filesystem import FileSystem, FileSystemReader, FileSystemWriter, _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor
from torch.futures import Future

MODEL_DIR = "model"
OPTIM_DIR = "optim"
METADATA = ".metadata"  # DCP's index of a directory: every tensor's chunks and where they are stored
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


# Parameter names stored by format-2 checkpoints -> the model's names since format 3; the
# tensors' shapes and layouts did not change (expert weights were [E, D, 2, F] by then).
RENAMED = {
    "w_gate_up_ED2F": "w_gate_up",
    "w_down_EFD": "w_down",
    "w_in_EDF": "w_in",
    "w_out_EFD": "w_out",
    "node_weight_ND": "node_weight",
    "node_bias_N": "node_bias",
}


def current_name(stored: str) -> str:
    """The model's name for a key a checkpoint stored: a parameter's name or a flattened
    optimizer key (`state.<name>.exp_avg`), renamed part by part; the one old-format converter."""
    return ".".join(RENAMED.get(part, part) for part in stored.split("."))


class ShapeMismatch(ValueError):
    """The checkpoint's tensors do not fit the model; the message names them."""


def model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return get_model_state_dict(module, options=_OPTIONS)


def optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return get_optimizer_state_dict(module, optimizer, options=_OPTIONS)


@contextlib.contextmanager
def _quiet(distributed: bool) -> Iterator[None]:
    """One process on purpose: DCP's "assuming the intent is ... a single process" warning is noise."""
    with warnings.catch_warnings():
        if not distributed:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


FileDigests = dict[str, dict[str, Any]]  # file path relative to the checkpoint -> {"bytes", "sha256"}


class _DigestingStream(io.RawIOBase):
    """A file being written that hashes every byte on its way to disk: the writer of a shard
    checksums it without reading it back."""

    def __init__(self, raw: io.IOBase) -> None:
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.sha256.update(view)
        self.bytes += len(view)
        return self.raw.write(view)

    def tell(self) -> int:
        return self.raw.tell()

    def fileno(self) -> int:
        return self.raw.fileno()

    def flush(self) -> None:
        self.raw.flush()


class _DigestingFileSystem(FileSystem):
    """DCP's local file system, recording the size and sha256 of every file it writes (under
    the name it ends up with: DCP writes `.metadata` as `.metadata.tmp` and renames it)."""

    def __init__(self) -> None:
        super().__init__()
        self.digests: dict[str, dict[str, Any]] = {}

    @contextlib.contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[io.IOBase]:
        with super().create_stream(path, mode) as raw:
            if "w" not in mode:
                yield raw
                return
            stream = _DigestingStream(raw)
            yield stream
            self.digests[str(path)] = {"bytes": stream.bytes, "sha256": stream.sha256.hexdigest()}

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        super().rename(path, new_path)
        if str(path) in self.digests:
            self.digests[str(new_path)] = self.digests.pop(str(path))


class _RunningHash:
    """sha256 of one file fed in file order: the slices a load reads (sorted by offset) and,
    read for the hash alone, the gaps between them and the tail after the last."""

    def __init__(self) -> None:
        self.sha256 = hashlib.sha256()
        self.upto = 0  # bytes [0, upto) are hashed

    def catch_up(self, stream: IO[bytes], offset: int) -> None:
        """Hash the bytes up to `offset` the load does not need (another layout's pieces)."""
        stream.seek(self.upto)
        while self.upto < offset:
            chunk = stream.read(min(_CHUNK, offset - self.upto))
            if not chunk:
                return  # shorter than the manifest says: the digest will differ
            self.sha256.update(chunk)
            self.upto += len(chunk)

    def take(self, offset: int, data: bytes) -> None:
        """Hash the part of a slice read at `offset` not hashed yet (a slice read twice counts once)."""
        if offset <= self.upto < offset + len(data):
            self.sha256.update(memoryview(data)[self.upto - offset :])
            self.upto = offset + len(data)


_CHUNK = 1 << 20


class _VerifyingReader(FileSystemReader):
    """DCP's file reader, changed in three ways that make a load's reads its checksums too:

    - every stored item is read once, in one read, into memory, where torch.load parses it
      (from the file, torch.load's zip reader re-reads parts of each small record: measured
      ~1.3x the bytes on the model's shards, ~3x on the optimizer's scalars);
    - a file's items are read in offset order, and the files in `hashed` are hashed as they
      pass (`digests()` adds what the load skipped), so the rank that owns a file checksums it
      without a second pass over it;
    - the metadata is read (and hashed) once, however often DCP and the shape checks ask.
    """

    def __init__(self, directory: Path, hashed: Collection[str] = ()) -> None:
        super().__init__(str(directory))
        self.directory = directory
        self._hashes = {name: _RunningHash() for name in hashed}
        self._metadata: Metadata | None = None
        self._metadata_digest: dict[str, Any] = {}

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:  # per-rank metadata of a save without collectives: not ours
            return super().read_metadata(*args, **kwargs)
        if self._metadata is None:
            data = (self.directory / METADATA).read_bytes()
            self._metadata_digest = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            self._metadata = pickle.loads(data)
            if getattr(self._metadata, "storage_meta", None) is None:
                self._metadata.storage_meta = StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        def position(item: ReadItem) -> tuple[str, int]:
            info = self.storage_data[item.storage_index]
            return info.relative_path, info.offset

        return super().read_data(dataclasses.replace(plan, items=sorted(plan.items, key=position)), planner)

    def _slice_file(self, file: IO[bytes], sinfo: _StorageInfo) -> IO[bytes]:
        running = self._hashes.get(sinfo.relative_path)
        if running is not None and running.upto < sinfo.offset:
            running.catch_up(file, sinfo.offset)
        file.seek(sinfo.offset)
        data = file.read(sinfo.length)
        if running is not None:
            running.take(sinfo.offset, data)
        return io.BytesIO(data)

    def digests(self) -> FileDigests:
        """Size and sha256 of `.metadata` and of every hashed file, whole: the bytes the load did
        not read are read now, for the checksum alone."""
        self.read_metadata()
        out = {METADATA: self._metadata_digest}
        for name, running in self._hashes.items():
            path = self.directory / name
            size = path.stat().st_size
            if running.upto < size:  # parts of it the load did not need, or a file it never opened
                with path.open("rb") as stream:
                    running.catch_up(stream, size)
            out[name] = {"bytes": running.upto, "sha256": running.sha256.hexdigest()}
        return out


def _save_digested(sd: dict[str, Any], directory: Path, distributed: bool) -> FileDigests:
    writer = FileSystemWriter(str(directory))
    writer.fs = file_system = _DigestingFileSystem()
    with _quiet(distributed):
        dcp.save(sd, storage_writer=writer, no_dist=not distributed)
    return file_system.digests


def save(directory: Path, model_sd: dict[str, Any], optim_sd: dict[str, Any] | None, distributed: bool) -> FileDigests:
    """Write this rank's shards (a collective when `distributed`); the size and checksum of every
    file this rank wrote, computed while writing, by path relative to `directory`."""
    digests = _save_digested(model_sd, directory / MODEL_DIR, distributed)
    if optim_sd:
        digests |= _save_digested(optim_sd, directory / OPTIM_DIR, distributed)
    return {str(Path(path).relative_to(directory)): meta for path, meta in digests.items()}


class AsyncShards:
    """Shards being written in the background by DCP's async_save: this rank's state was copied
    (staged) when the save began, so training may change the live tensors meanwhile."""

    def __init__(self, directory: Path, writes: list[tuple[futures.Future, _DigestingFileSystem]]) -> None:
        self.directory = directory
        self._writes = writes

    def result(self) -> FileDigests:
        """Block until this rank's files are written (and, DCP's last collective, every rank's
        and the indexes); their sizes and checksums, as `save` returns them."""
        digests: FileDigests = {}
        for future, file_system in self._writes:
            future.result()
            digests |= file_system.digests
        return {str(Path(path).relative_to(self.directory)): meta for path, meta in digests.items()}


def save_async(
    directory: Path,
    model_sd: dict[str, Any],
    optim_sd: dict[str, Any] | None,
    distributed: bool,
    groups: tuple[Any, Any] | None,
) -> AsyncShards:
    """`save`, in the background: returns once this rank's state is staged (copied to CPU
    memory). The model and the optimizer state are written concurrently, each over its own
    process group of `groups` (gloo: DCP's async save needs a CPU backend, and a group used by
    one background writer only, never by the training loop's collectives)."""
    if not distributed:
        # Raised in DCP's writer thread, where no catch_warnings block of ours (_quiet) reaches:
        # silenced for the process. One process on purpose; the warning is noise.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
    writes = []
    for sd, what, group in ((model_sd, MODEL_DIR, groups and groups[0]), (optim_sd, OPTIM_DIR, groups and groups[1])):
        if not sd:
            continue
        writer = FileSystemWriter(str(directory / what))
        writer.fs = file_system = _DigestingFileSystem()
        with _quiet(distributed):
            future = dcp.async_save(sd, storage_writer=writer, process_group=group, no_dist=not distributed)
        writes.append((future, file_system))
    return AsyncShards(directory, writes)


def tensors_of(metadata: Metadata) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {
        current_name(key): (tuple(meta.size), meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata)
    }


def stored_tensors(directory: Path, what: str = MODEL_DIR) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Global shape and dtype of every tensor in a DCP directory (from its metadata), by the
    model's names."""
    return tensors_of(dcp.FileSystemReader(str(directory / what)).read_metadata())


def _load(sd: dict[str, Any], reader: _VerifyingReader, distributed: bool) -> None:
    """dcp.load into `sd` (the model's names), each entry read from the key it was stored under.
    Tensors load in place; other values (an optimizer's lr, step) are replaced, so copy them back."""
    stored_key = {current_name(key): key for key in reader.read_metadata().state_dict_metadata}
    renamed = {stored_key.get(name, name): value for name, value in sd.items()}
    with _quiet(distributed):
        dcp.load(renamed, storage_reader=reader, no_dist=not distributed)
    for name in sd:
        sd[name] = renamed[stored_key.get(name, name)]


def check_fits(
    stored: dict[str, tuple[tuple[int, ...], torch.dtype]], targets: dict[str, torch.Tensor], partial: bool = False
) -> None:
    """Raise ShapeMismatch naming the tensors whose global shapes differ, or that either side
    lacks (`partial`: the targets are one pipeline stage's, other tensors are expected)."""
    missing = sorted(set(targets) - set(stored))
    unexpected = [] if partial else sorted(set(stored) - set(targets))
    differ = [
        f"{name} is {stored[name][0]} in the checkpoint, {tuple(t.shape)} in the model"
        for name, t in targets.items()
        if name in stored and tuple(stored[name][0]) != tuple(t.shape)
    ]
    problems = []
    if differ:
        problems.append(f"{len(differ)} tensors differ in shape: " + "; ".join(differ[:3]))
    for what, names in (("missing", missing), ("unexpected", unexpected)):
        if names:
            problems.append(f"{what} {names[:3]}" + (f" and {len(names) - 3} more" if len(names) > 3 else ""))
    if problems:
        raise ShapeMismatch("checkpoint does not fit the model: " + ", ".join(problems))


def _reader(directory: Path, what: str, hashed: Collection[str]) -> _VerifyingReader:
    """The reader of one DCP directory, hashing those of `hashed` (paths relative to the
    checkpoint, like a manifest's) that lie in it."""
    prefix = what + "/"
    return _VerifyingReader(directory / what, [n.removeprefix(prefix) for n in hashed if n.startswith(prefix)])


def _relative(what: str, digests: FileDigests) -> FileDigests:
    return {f"{what}/{name}": meta for name, meta in digests.items()}


def load_model(
    directory: Path, module: nn.Module, distributed: bool, *, partial: bool = False, hashed: Collection[str] = ()
) -> FileDigests:
    """Load the model shards this rank holds from any layout's checkpoint (collective when
    distributed); the size and sha256 of `model/.metadata` and of the files of `hashed` under
    `model/`, computed from the load's own reads."""
    sd = model_state(module)
    reader = _reader(directory, MODEL_DIR, hashed)
    check_fits(tensors_of(reader.read_metadata()), sd, partial)
    _load(sd, reader, distributed)
    set_model_state_dict(module, sd, options=_OPTIONS)
    return _relative(MODEL_DIR, reader.digests())


def load_optimizer(
    directory: Path,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    distributed: bool,
    *,
    hashed: Collection[str] = (),
) -> FileDigests:
    """Load this rank's optimizer state from any layout's checkpoint (collective when
    distributed); digests as `load_model`'s, for `optim/`."""
    osd = optimizer_state(module, optimizer)  # builds the state's structure (a zero-lr step on a fresh optimizer)
    reader = _reader(directory, OPTIM_DIR, hashed)
    stored = tensors_of(reader.read_metadata())
    wanted = {k: v for k, v in osd.items() if isinstance(v, torch.Tensor)}
    missing = sorted(set(wanted) - set(stored))
    if missing:
        raise ShapeMismatch(f"optimizer state does not fit the model: missing {missing[:3]}")
    _load(osd, reader, distributed)
    set_optimizer_state_dict(module, optimizer, osd, options=_OPTIONS)
    return _relative(OPTIM_DIR, reader.digests())


def read_full(directory: Path, what: str = MODEL_DIR) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP directory as a whole CPU tensor, in this one process."""
    reader = _VerifyingReader(directory / what)
    full = {key: torch.empty(shape, dtype=dtype) for key, (shape, dtype) in tensors_of(reader.read_metadata()).items()}
    _load(full, reader, distributed=False)
    return full


def read_tensor(directory: Path, name: str, what: str = MODEL_DIR) -> torch.Tensor:
    """One tensor of a DCP directory, whole, in this one process; no other tensor is read."""
    reader = _VerifyingReader(directory / what)
    shape, dtype = tensors_of(reader.read_metadata())[name]
    one = {name: torch.empty(shape, dtype=dtype)}
    _load(one, reader, distributed=False)
    return one[name]


def local_non_finite(sd: dict[str, Any]) -> str | None:
    """The first floating-point tensor with a non-finite value in this rank's shards, if any."""
    for name, t in sd.items():
        if isinstance(t, torch.Tensor):
            local = t.to_local() if isinstance(t, DTensor) else t
            if local.is_floating_point() and local.numel() and not torch.isfinite(local).all():
                return name
    return None
