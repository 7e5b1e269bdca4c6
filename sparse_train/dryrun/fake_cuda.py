"""A fake CUDA device on a CPU-only PyTorch build, for running the training code on fake tensors.

Two parts:

- **A C++ library** (`csrc/fake_cuda.cpp`) registering a CUDA device guard and CUDA hooks that
  only track device indices. Without them, autograd's engine aborts on the first backward over
  fake CUDA tensors and CPU->CUDA copies are refused. The hooks are cached by libtorch the first
  time anything asks (already during `import torch`), so the library must be loaded before
  torch: the dry run re-executes itself with it in `LD_PRELOAD` (`preload_environment`).
- **Python stand-ins** for the parts of `torch.cuda` a CPU build does not have (streams,
  events, the RNG state, device queries), and for two DTensor/DeviceMesh helpers that must
  compute on real values (`patched`). They are installed only for the dry run's duration.

Nothing here ever runs a kernel or allocates device memory: every CUDA tensor is a fake tensor.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch

_SOURCE = Path(__file__).parent / "csrc" / "fake_cuda.cpp"
_SYMBOL = "sparse_train_fake_cuda_devices"
DEVICES_ENV = "SPARSE_TRAIN_FAKE_CUDA_DEVICES"


class FakeCudaUnavailable(RuntimeError):
    """The fake CUDA library cannot be built or is not loaded (the message says which)."""


def is_loaded() -> bool:
    """Whether this process started with the fake CUDA library (LD_PRELOAD)."""
    return hasattr(ctypes.CDLL(None), _SYMBOL)


def library_path() -> Path:
    """The compiled library, built on first use (~5 s with g++) and cached per torch build."""
    torch_dir = Path(torch.__file__).parent
    key = hashlib.sha1(_SOURCE.read_bytes() + torch.__version__.encode() + str(torch_dir).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sparse_train"
    target = cache / f"fake_cuda-{key}.so"
    if target.exists():
        return target
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise FakeCudaUnavailable("the CUDA dry run builds a small C++ library and needs g++ (or $CXX): none found")
    cache.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.tmp")
    command = [
        compiler, "-shared", "-fPIC", "-O1", "-std=c++20", "-w",
        f"-I{torch_dir / 'include'}", str(_SOURCE),
        f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_dir / 'lib'}",
        "-o", str(partial),
    ]  # fmt: skip
    built = subprocess.run(command, capture_output=True, text=True)
    if built.returncode != 0:
        first = next((line for line in built.stderr.splitlines() if "error" in line), built.stderr.strip()[:200])
        raise FakeCudaUnavailable(f"building the fake CUDA library failed: {first}")
    partial.replace(target)  # atomic: concurrent builders never load a half-written file
    return target


def preload_environment(devices: int) -> dict[str, str]:
    """The environment of a process that starts with the fake CUDA library, `devices` per node."""
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(filter(None, [str(library_path()), env.get("LD_PRELOAD", "")]))
    env[DEVICES_ENV] = str(devices)
    return env


class _Stream:
    """torch.cuda.Stream / Event stand-in: ordering is moot when nothing runs."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.device = torch.device("cuda")

    def wait_stream(self, other: object) -> None: ...
    def wait_event(self, event: object) -> None: ...
    def record_event(self, event: object | None = None) -> _Stream:
        return event if event is not None else _Stream()

    def record(self, stream: object | None = None) -> None: ...
    def synchronize(self) -> None: ...
    def query(self) -> bool:
        return True

    def is_capturing(self) -> bool:
        return False


def real_values(fn):
    """`fn` run with fake mode off: it computes plain numbers (ranks of a mesh, a shard's offset)
    from tensors it builds itself, which under fake mode would turn fake and unreadable."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    def call(*args, **kwargs):
        with unset_fake_temporarily():
            return fn(*args, **kwargs)

    return call


def _real_valued_class(cls: type) -> list:
    """Patches running every method and property of `cls` with fake mode off."""
    patches = []
    for name, member in vars(cls).items():
        if isinstance(member, property):
            wrapped = property(real_values(member.fget), member.fset, member.fdel, member.__doc__)
        elif isinstance(member, staticmethod):
            wrapped = staticmethod(real_values(member.__func__))
        elif isinstance(member, classmethod):
            wrapped = classmethod(real_values(member.__func__))
        elif callable(member) and not isinstance(member, type):
            wrapped = real_values(member)
        else:
            continue
        patches.append(mock.patch.object(cls, name, wrapped))
    return patches


@contextlib.contextmanager
def patched(devices: int) -> Iterator[None]:
    """torch.cuda and DTensor helpers made to work on fake CUDA tensors, for the block's duration."""
    if not is_loaded():
        raise FakeCudaUnavailable("the fake CUDA library is not loaded: run through `sparse-train dry-run`")
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import _utils as dtensor_utils

    current = SimpleNamespace(index=0)

    def set_device(device: torch.device | int | str) -> None:
        current.index = torch.device(device).index if not isinstance(device, int) else device

    real_tensor = torch.tensor

    def tensor(data, *, dtype=None, device=None, requires_grad=False, pin_memory=False):
        # A CPU build copies the data onto a CUDA device with a real kernel: copy through an op
        # fake mode sees instead (a CPU tensor, then .to(device)).
        if device is None or torch.device(device).type != "cuda":
            return real_tensor(data, dtype=dtype, device=device, requires_grad=requires_grad, pin_memory=pin_memory)
        moved = real_tensor(data, dtype=dtype).to(device)
        return moved.requires_grad_() if requires_grad else moved

    real_new_tensor = torch.Tensor.new_tensor

    def new_tensor(self, data, *, dtype=None, device=None, requires_grad=False, **kwargs):
        target = torch.device(device) if device is not None else self.device
        if target.type != "cuda":
            return real_new_tensor(self, data, dtype=dtype, device=device, requires_grad=requires_grad, **kwargs)
        moved = real_tensor(data, dtype=dtype or self.dtype).to(target)  # as torch.tensor above
        return moved.requires_grad_() if requires_grad else moved

    rng_state = torch.zeros(16, dtype=torch.uint8)
    stream = _Stream()
    patches = [
        mock.patch("torch.tensor", tensor),
        mock.patch.object(torch.Tensor, "new_tensor", new_tensor),
        mock.patch("torch.cuda.is_available", lambda: True),
        mock.patch("torch.cuda.device_count", lambda: devices),
        mock.patch("torch.cuda.current_device", lambda: current.index),
        mock.patch("torch.cuda.set_device", set_device),
        mock.patch("torch.cuda.is_bf16_supported", lambda *a, **k: True),
        mock.patch("torch.cuda.Stream", _Stream),
        mock.patch("torch.cuda.Event", _Stream),
        mock.patch("torch.cuda.current_stream", lambda *a, **k: stream),
        mock.patch("torch.cuda.stream", lambda *a, **k: contextlib.nullcontext()),
        mock.patch("torch.cuda.synchronize", lambda *a, **k: None),
        mock.patch("torch.cuda.get_rng_state", lambda *a, **k: rng_state.clone()),
        mock.patch("torch.cuda.set_rng_state", lambda *a, **k: None),
        mock.patch("torch.cuda.manual_seed", lambda *a, **k: None),
        mock.patch("torch.cuda.manual_seed_all", lambda *a, **k: None),
        mock.patch("torch.cuda.max_memory_allocated", lambda *a, **k: 0),
        mock.patch("torch.cuda.reset_peak_memory_stats", lambda *a, **k: None),
        mock.patch("torch.cuda.mem_get_info", lambda *a, **k: (80 << 30, 80 << 30)),
        mock.patch("torch.accelerator.current_stream", lambda *a, **k: stream),
        # Small tensors made from Python data are "constants" that fake mode computes on for
        # real, which on a CUDA device would run a kernel: keep every tensor fake instead.
        mock.patch("torch._subclasses.fake_tensor.CONSTANT_NUMEL_LIMIT", 0),
        *_real_valued_class(DeviceMesh),  # rank tables: every method computes with real values
        mock.patch.object(
            dtensor_utils,
            "_compute_local_shape_and_global_offset",
            real_values(dtensor_utils._compute_local_shape_and_global_offset),
        ),
    ]
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        yield
