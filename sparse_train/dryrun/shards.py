"""A checkpoint's shards in a dry run: planned by DCP as a real save and load plan them, kept in
memory without their bytes (fake tensors have none).

The save runs DCP's save planning on this rank's fake state dicts and keeps the index it
produces (every tensor's global shape and this rank's chunks); the load then plans against that
index as against a real `.metadata`, and "reads" each chunk as a CPU tensor copied into its fake
target, as the real reader does with the bytes it read. So a resume and an `--init-from` of a
checkpoint run all of the trainer's own load code (the shape checks, DCP's planning, the state
dicts' setters, the ranks' agreement) on the dry run's devices.

DCP plans without collectives here (`no_dist`): its object collectives are its own, pickled on
whatever device their group's backend wants; what the dry run checks is the training code's.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from sparse_train.train import sharded


def _done(value: Any) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


class _IndexOnlyWriter(StorageWriter):
    """Keeps DCP's index of a save and the small non-tensor entries (an optimizer's step); no
    tensor's bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.metadata: Metadata | None = None
        self.objects: dict[str, bytes] = {}

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        pass

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return plans

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        results = []
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                self.objects[item.index.fqn] = planner.resolve_data(item).getvalue()
            results.append(WriteResult(index=item.index, size_in_bytes=0, storage_data=None))
        return _done(results)

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        metadata.storage_meta = StorageMeta()
        self.metadata = metadata

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return True


class _IndexReader(StorageReader):
    """Serves a kept index; each chunk arrives as a CPU tensor of its size (zeros), copied into
    the load's target."""

    def __init__(self, written: _IndexOnlyWriter) -> None:
        super().__init__()
        assert written.metadata is not None
        self.written = written
        self.metadata = written.metadata

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return self.metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        pass

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                planner.load_bytes(item, io.BytesIO(self.written.objects[item.storage_index.fqn]))
                continue
            target = planner.resolve_tensor(item).detach()
            target.copy_(torch.zeros(tuple(item.lengths), dtype=target.dtype))  # read from "disk": the host
            planner.commit_tensor(item, target)
        return _done(None)

    def digests(self) -> sharded.FileDigests:
        return {}  # no file was read

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return True


class ShardsInMemory:
    """Stand-ins for `sharded.save`, `sharded.save_async`, `sharded._reader` and
    `sharded.stored_tensors`, over one checkpoint's kept indexes (a dry run saves once)."""

    def __init__(self) -> None:
        self.written: dict[str, _IndexOnlyWriter] = {}
        # Every tensor of the whole model, by shape and dtype: under a pipeline, the tensors of the
        # other stages, which their ranks (absent here) would have written.
        self.whole_model: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}

    def _keep(self, what: str, sd: dict[str, Any]) -> None:
        writer = _IndexOnlyWriter()
        with _single_process_is_meant():
            dcp.save(sd, storage_writer=writer, no_dist=True)
        self.written[what] = writer

    def save(self, directory: Path, model_sd: dict, optim_sd: dict | None, distributed: bool) -> sharded.FileDigests:
        self._keep(sharded.MODEL_DIR, model_sd)
        if optim_sd:
            self._keep(sharded.OPTIM_DIR, optim_sd)
        return {}  # no file written, so no digest

    def save_async(self, directory: Path, model_sd: dict, optim_sd: dict | None, distributed: bool, groups: Any):
        self.save(directory, model_sd, optim_sd, distributed)
        return _Saved()

    def reader(self, directory: Path, what: str, hashed: Collection[str]) -> _IndexReader:
        if what not in self.written:
            raise FileNotFoundError(f"{directory / what}: the dry run saved no {what} shards")
        return _IndexReader(self.written[what])

    def stored_tensors(self, directory: Path, what: str = sharded.MODEL_DIR) -> dict:
        here = sharded.tensors_of(self.reader(directory, what, ()).read_metadata())
        return {**self.whole_model, **here} if what == sharded.MODEL_DIR else here


class _Saved:
    def result(self) -> sharded.FileDigests:
        return {}


def load_without_collectives(load: Any) -> Any:
    """dcp.load planning on this rank alone (module docstring)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        with _single_process_is_meant():
            return load(*args, **{**kwargs, "no_dist": True})

    return call


@contextlib.contextmanager
def _single_process_is_meant() -> Iterator[None]:
    """DCP warns that it assumes one process when told no_dist: here that is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield
