"""Hard FFF inference: descend the tree, run each token's one leaf, grouped by leaf.

Backends:
  "torch"  all node logits with the training path's own matmul, the descent level by level on
           them (one gather per level), then the leaves through the expert kernels over tokens
           sorted by leaf. Bit for bit the `hard` training forward (tests check torch.equal).
  "cpp"    csrc/fff_infer.cpp, built with torch.utils.cpp_extension on first use and cached:
           the descent as d dot products per token (no [T, N] logit matrix), a counting sort,
           and each leaf's FFN over its tokens with its weights read once. CPU, fp32. Same
           leaves as "torch"; outputs equal up to fp32 summation order.
  "auto"   "cpp" where it applies (CPU, fp32) and builds, else "torch". A failed build is
           reported once as a warning naming the error, never silently.

Shape legend: T tokens, D model width, N nodes, L leaves, F leaf width, O output width.
"""

from __future__ import annotations

import hashlib
import platform
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from sparse_train.models.dispatch import ExpertInput
from sparse_train.models.experts import SwiGLUExperts
from sparse_train.models.routers import count_per_expert

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


def leaf_weights(experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(w_in [L, D, H], w_out [L, F, O], swiglu) of SwiGLU or GELU leaves."""
    if isinstance(experts, SwiGLUExperts):
        return experts.w_gate_up_ED2F.flatten(2), experts.w_down_EFD, True
    return experts.w_in_EDF, experts.w_out_EFD, False


def _cpp_unsupported(x_TD: torch.Tensor, weights: list[torch.Tensor]) -> str | None:
    if x_TD.device.type != "cpu":
        return f"it runs on CPU tensors, got {x_TD.device.type}"
    if any(t.dtype != torch.float32 for t in (x_TD, *weights)):
        return "it computes in fp32"
    return None


def fff_hard_forward(
    x_TD: torch.Tensor, tree: nn.Module, experts: nn.Module, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y [T, O], leaf [T], tokens per leaf [L]) of the hard descent; `tree` a models.fff.TreeRouter,
    `experts` its leaves."""
    if backend not in ("auto", "cpp", "torch"):
        raise ValueError(f"unknown FFF inference backend {backend!r}; allowed: auto, cpp, torch")
    w_in, w_out, swiglu = leaf_weights(experts)
    if backend != "torch":
        reason = _cpp_unsupported(x_TD, [tree.node_weight_ND, w_in, w_out])
        if reason is None:
            try:
                ext = cpp_extension()
            except RuntimeError as err:
                if backend == "cpp":
                    raise
                _warn_once(f"{err}; FFF inference uses the torch backend")
            else:
                with torch.no_grad():  # inference only: the kernel has no backward
                    return ext.fff_hard_forward(
                        x_TD.contiguous(),
                        tree.node_weight_ND.contiguous(),
                        tree.node_bias_N.contiguous(),
                        w_in.contiguous(),
                        w_out.contiguous(),
                        tree.depth,
                        swiglu,
                    )
        elif backend == "cpp":
            raise ValueError(f"FFF inference backend 'cpp' does not apply: {reason}")
    return _torch_hard_forward(x_TD, tree, experts)


def _torch_hard_forward(x_TD: torch.Tensor, tree: nn.Module, experts: nn.Module):
    from sparse_train.models.fff import descend

    leaf_T = descend(tree(x_TD), tree.depth)
    order_T = torch.argsort(leaf_T, stable=True)  # the training path's sort of (token, leaf) pairs
    counts_L = count_per_expert(leaf_T, experts.num_experts)
    return experts(ExpertInput(x_TD, order_T, counts_L, None)), leaf_T, counts_L


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
