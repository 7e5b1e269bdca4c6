"""Hard FFF inference, fused: descend the tree and run each token's one leaf, grouped by leaf.

csrc/fff_infer.cpp, built with torch.utils.cpp_extension on first use and cached: the descent
as d dot products per token (no [T, N] logit matrix), a counting sort, and each leaf's FFN
over its tokens with its weights read once. CPU, fp32. It takes plain tensors; the layer
(sparse_train.models.fff.fff_hard_forward) chooses between it and the torch path:
  "torch"  the torch path only (models.fff: the training path's own matmul and descent, the
           leaves through the expert kernels; bit for bit the `hard` training forward)
  "cpp"    this kernel; an error where it does not apply or does not build
  "auto"   this kernel where it applies (CPU, fp32) and builds, else the torch path. A failed
           build is reported once as a warning naming the error, never silently.
The kernel takes the same leaves as the torch path; outputs equal up to fp32 summation order.

Shape legend: T tokens, D model width, N nodes, L leaves, H leaf input width (F, or 2F for
SwiGLU's gate and up), F leaf width, O output width.
"""

from __future__ import annotations

import hashlib
import platform
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

BACKENDS = ("auto", "cpp", "torch")
_SOURCE = Path(__file__).parent / "csrc" / "fff_infer.cpp"
_lock = threading.Lock()
_extension: ModuleType | None = None
_build_error: str | None = None


def _machine_tag() -> str:
    """Compiled with -march=native: key the build cache by the CPU so a shared cache never
    serves one machine's binary to another."""
    flags = platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            flags += next((line for line in fh if line.startswith("flags")), "")
    except OSError:
        flags += platform.processor()
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


def cpp_extension() -> ModuleType:
    """The compiled kernel (built on the first call, ~30-60 s; later processes load the cache)."""
    global _extension, _build_error
    if _extension is not None:  # the common case, without taking the lock
        return _extension
    with _lock:
        if _extension is not None:
            return _extension
        if _build_error is not None:
            raise RuntimeError(_build_error)
        from torch.utils.cpp_extension import load

        try:
            _extension = load(
                name=f"sparse_train_fff_infer_{_machine_tag()}",
                sources=[str(_SOURCE)],
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        except Exception as err:  # compiler missing, headers missing, ...: say which
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            _build_error = f"building the FFF inference kernel failed: {first_line}"
            raise RuntimeError(_build_error) from err
        return _extension


def _cpp_unsupported(x_TD: torch.Tensor, weights: list[torch.Tensor]) -> str | None:
    if x_TD.device.type != "cpu":
        return f"it runs on CPU tensors, got {x_TD.device.type}"
    if any(t.dtype != torch.float32 for t in (x_TD, *weights)):
        return "it computes in fp32"
    return None


def fused_hard_forward(
    x_TD: torch.Tensor,
    node_weight_ND: torch.Tensor,
    node_bias_N: torch.Tensor,
    w_in_LDH: torch.Tensor,
    w_out_LFO: torch.Tensor,
    *,
    depth: int,
    swiglu: bool,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(y [T, O], leaf [T], tokens per leaf [L]) of the hard descent by the fused kernel, or None
    where the caller runs its torch path: backend "torch", or "auto" when the kernel does not
    apply or did not build. SwiGLU leaves' w_in holds gate then up columns ([L, D, 2F])."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown FFF inference backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend == "torch":
        return None
    reason = _cpp_unsupported(x_TD, [node_weight_ND, w_in_LDH, w_out_LFO])
    if reason is not None:
        if backend == "cpp":
            raise ValueError(f"FFF inference backend 'cpp' does not apply: {reason}")
        return None
    try:
        ext = cpp_extension()
    except RuntimeError as err:
        if backend == "cpp":
            raise
        _warn_once(f"{err}; FFF inference uses the torch backend")
        return None
    with torch.no_grad():  # inference only: the kernel has no backward
        return ext.fff_hard_forward(
            x_TD.contiguous(),
            node_weight_ND.contiguous(),
            node_bias_N.contiguous(),
            w_in_LDH.contiguous(),
            w_out_LFO.contiguous(),
            depth,
            swiglu,
        )


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
