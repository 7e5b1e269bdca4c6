"""What the dry run checks, op by op: a dispatch mode stacked on the fake tensor mode.

Every aten and c10d op the training code issues passes through `Checks.__torch_dispatch__`
with its fake arguments, so three GPU-run failures can be seen on a CPU-only machine:

- **host reads**: `.item()`, `float(t)`, `bool(t)` / Python `if` on a tensor (`_local_scalar_dense`,
  `is_nonzero`), `.tolist()`, and copies from the device to the CPU (`.cpu()`). A GPU run
  stalls on each; only a reported step (logging, evaluation, checkpoint) and the first step's
  one-time set-up may read. Where reads are allowed they get a benign answer (`_placeholder`),
  so the code runs on: the values are fake anyway;
- **collectives on a device their backend does not serve**: the tensors of every c10d op are
  checked against the devices the real run's backend serves (`served_devices`); inside a
  training step or evaluation only the training device is allowed, whatever the backend
  (decision 45: the step keeps its collectives on the device);
- **CPU tensors made inside the step**: a factory op (no tensor input) creating a CPU tensor, or
  a tensor made from Python data (`torch.tensor`, `new_tensor`: `lift_fresh`), which a GPU run
  would then copy to the device, while the step runs.

A finding names the innermost frame of sparse_train (not of the dry run itself) that led to it.
"""

from __future__ import annotations

import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from sparse_train.parallel.collective_record import CollectiveCall, collective_call, is_collective

HOST_READ_OPS = ("aten::_local_scalar_dense", "aten::is_nonzero", "aten::item")
PACKAGE = "/sparse_train/"
OWN = "/sparse_train/dryrun/"
# Frames that stand in for torch (the fake device's constructors): not a site, look past them.
TRANSPARENT = ("/sparse_train/dryrun/fake_cuda.py",)
# The input pipeline builds each micro-batch on the host by design; it moves to the device once.
HOST_SIDE = ("/sparse_train/data/",)


def served_devices(backend: str) -> set[str]:
    """Device types a process-group backend string serves: "nccl" -> {cuda}, "gloo" -> {cpu},
    "cuda:nccl,cpu:gloo" -> {cuda, cpu}."""
    by_backend = {"nccl": {"cuda"}, "gloo": {"cpu"}, "fake": {"cpu", "cuda"}}
    served: set[str] = set()
    for part in backend.split(","):
        device, _, name = part.rpartition(":")
        served |= {device} if device else by_backend.get(name, set())
    return served


@dataclass(frozen=True)
class Finding:
    phase: str
    kind: str  # "host read" | "collective device" | "cpu tensor"
    op: str
    site: str

    def line(self) -> str:
        return f"{self.phase}: {self.kind}: {self.op} at {self.site}"


@dataclass
class Phase:
    name: str
    reads_allowed: bool
    collective_devices: set[str]
    cpu_tensors_allowed: bool


@dataclass
class Checks(TorchDispatchMode):
    """The dispatch mode; enter it inside FakeTensorMode, and each phase with `phase(...)`."""

    device_type: str
    findings: list[Finding] = field(default_factory=list)
    collectives: Counter = field(default_factory=Counter)  # (phase, op) -> calls
    # phase -> each collective call: (op, bytes of its largest tensor, the group's global ranks)
    collective_calls: dict[str, list[CollectiveCall]] = field(default_factory=dict)
    host_reads: Counter = field(default_factory=Counter)  # phase -> reads (where allowed: answered with zeros)
    current: Phase | None = None
    # where a collective is called from (a measured step sets it: the model's unit, dryrun.measure)
    unit_of_call: Callable[[], str] | None = None

    def __post_init__(self) -> None:
        super().__init__()

    @contextmanager
    def phase(self, name: str, *, reads: bool, collective_devices: set[str], cpu_tensors: bool) -> Iterator[None]:
        previous, self.current = self.current, Phase(name, reads, collective_devices, cpu_tensors)
        try:
            with _tolist_checked(self):
                yield
        finally:
            self.current = previous

    def report(self, kind: str, op: str) -> None:
        site = _site()
        if site is None or self.current is None:  # the dry run's own code, or outside any phase
            return
        if kind == "cpu tensor" and any(part.strip("/") in site for part in HOST_SIDE):
            return
        finding = Finding(self.current.name, kind, op, site)
        if finding not in self.findings:
            self.findings.append(finding)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _fake_mode_active():  # real values computed on purpose (meshes, shard offsets): not the run's
            return func(*args, **kwargs)
        name = func.name()
        phase = self.current
        if phase is not None and any(op in name for op in HOST_READ_OPS):
            self.host_reads[phase.name] += 1
            if not phase.reads_allowed:
                self.report("host read", name)
            return _placeholder(name, args)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if phase is not None and is_collective(name):
            self.collectives[(phase.name, name)] += 1
            unit = self.unit_of_call() if self.unit_of_call is not None else ""
            self.collective_calls.setdefault(phase.name, []).append(collective_call(name, args, kwargs, unit))
            # a barrier's tensor is made by the backend itself, on a device it serves (NCCL: the
            # current CUDA device); under the fake group it is a CPU one, not the caller's doing
            checked = [] if name == "c10d::barrier" else tensors
            for device in {t.device.type for t in checked} - phase.collective_devices:
                self.report("collective device", f"{name} on a {device} tensor")
        out = func(*args, **kwargs)
        if phase is not None and not phase.cpu_tensors_allowed:
            self._check_outputs(name, tensors, out)
        return out

    def _check_outputs(self, name: str, inputs: list[torch.Tensor], out: Any) -> None:
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not any(t.device.type == "cpu" for t in outputs):
            return
        from_device = any(t.device.type == self.device_type for t in inputs)
        if from_device:
            self.report("host read", f"{name} (device to CPU)")
        elif not inputs or "lift_fresh" in name:  # a factory, or a tensor made from Python data
            self.report("cpu tensor", f"{name} creates a CPU tensor")


def _fake_mode_active() -> bool:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return any(isinstance(mode, FakeTensorMode) for mode in _get_current_dispatch_mode_stack())


def _placeholder(name: str, args: tuple) -> Any:
    """What a host read returns where reads are allowed (the values are fake anyway): the benign
    answer of its kind, so the code takes its usual path: true for a flag or a condition (all
    finite, all ranks agree), one for an integer (a count, a pipeline stage's vote for static
    shapes), zero for a float (a loss, a norm)."""
    tensor = args[0]
    if "is_nonzero" in name or tensor.dtype == torch.bool:
        return True
    return 0.0 if tensor.dtype.is_floating_point or tensor.dtype.is_complex else 1


@contextmanager
def _tolist_checked(checks: Checks) -> Iterator[None]:
    """`.tolist()` of a fake tensor reads its storage directly (no op to see): patched to report
    where reads are not allowed, and to return zeros of its shape."""
    from unittest import mock

    from torch._subclasses.fake_tensor import FakeTensor

    def tolist(self: torch.Tensor) -> Any:
        if checks.current is not None:
            checks.host_reads[checks.current.name] += 1
            if not checks.current.reads_allowed:
                checks.report("host read", "Tensor.tolist")
        zeros: Any = _placeholder("", (self,))
        for size in reversed(self.shape):
            zeros = [zeros] * size
        return zeros

    with mock.patch.object(FakeTensor, "tolist", tolist, create=True):
        yield


def _site() -> str | None:
    """`file:line in function` of the innermost sparse_train frame; None inside the dry run's own code."""
    return _innermost(traceback.extract_stack())


def traceback_site(err: BaseException) -> str:
    """Where `err` was raised, as `_site` names it (the dry run's own frames skipped)."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if OWN not in f.filename]
    return _innermost(frames) or "outside sparse_train"


def _innermost(frames: list[traceback.FrameSummary]) -> str | None:
    ours = [
        f for f in frames if PACKAGE in f.filename and f.filename != __file__ and not f.filename.endswith(TRANSPARENT)
    ]
    if not ours or OWN in ours[-1].filename:
        return None
    frame = ours[-1]
    return f"{Path(frame.filename).relative_to(Path(__file__).parents[2])}:{frame.lineno} in {frame.name}"
