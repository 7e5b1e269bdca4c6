"""Process-level runtime settings applied by the `sparse-train` entry point.

glibc malloc on Linux hands every allocation above 128 KiB (a dynamic threshold, at most
32 MiB) to a fresh mmap and returns it to the kernel on free. A training step allocates and
frees hundreds of MiB of activations, so every step pays page faults to map and zero them
again: measured on the 2-core dev machine, up to a third of an MoE layer's forward+backward was
kernel time, and the step time varied by +-30%. Keeping freed memory in the process and using
huge pages for the largest tensors (the settings below, read only at process start, hence the
one-time re-exec) removes nearly all of it; it helps dense and sparse layers alike.
Set SPARSE_TRAIN_MALLOC_TUNING=0 to opt out; values already in the environment win.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Sequence

MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),  # allocations up to 32 MiB come from the heap...
    "MALLOC_TRIM_THRESHOLD_": str(16 << 30),  # ...which is not handed back to the kernel on free
    "MALLOC_TOP_PAD_": str(512 << 20),  # grow the heap in large steps
    # Larger tensors stay mmapped; PyTorch then asks for 2 MiB pages (madvise), one fault per
    # 2 MiB instead of per 4 KiB. Read once by torch's CPU allocator, so it too must be set early.
    "THP_MEM_ALLOC_ENABLE": "1",
}


def tuned_allocator_env(environ: dict[str, str]) -> dict[str, str] | None:
    """The environment to re-exec with, or None when there is nothing to do."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    if environ.get("SPARSE_TRAIN_MALLOC_TUNING", "1") == "0" or all(k in environ for k in MALLOC_ENV):
        return None
    return {**MALLOC_ENV, **environ}


def exec_with_tuned_allocator(argv: Sequence[str]) -> None:
    """Re-exec this command once with glibc malloc tuned (no-op elsewhere or when already done)."""
    env = tuned_allocator_env(dict(os.environ))
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", "sparse_train", *argv], env)


def environment_info() -> dict:
    """Versions, devices, optional integrations and the runtime settings in force (`sparse-train info`)."""
    import importlib.metadata

    import torch

    import sparse_train

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "sparse_train": sparse_train.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": torch.cuda.device_count(),
        "threads": torch.get_num_threads(),
        "integrations": {name: version(name) for name in ("triton", "transformers", "deepspeed", "ray")},
        "malloc_tuning": {key: os.environ.get(key) for key in MALLOC_ENV},
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
    }
