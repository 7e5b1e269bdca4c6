"""Inter-op parallelism for the per-expert loops of the CPU kernels.

A per-expert loop issues many mid-sized ops (GEMMs of ~1-2k rows, gathers, scatter-adds,
elementwise). Splitting each of them across the intra-op threads costs a fork/join barrier
per op and halves every GEMM; running whole experts on separate threads, each op
single-threaded, keeps every core busy on its own experts instead (measured on 2 cores: ~10%
faster per layer). torch ops release the GIL, so Python threads suffice.

Each worker thread runs with one intra-op thread (`torch.set_num_threads` is per thread), so
the pool never oversubscribes the cores the caller's `torch.get_num_threads()` grants.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")

_lock = threading.Lock()
_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, pool)


def _single_threaded() -> None:
    torch.set_num_threads(1)


def _executor(workers: int) -> ThreadPoolExecutor:
    """A pool of `workers` single-threaded workers, rebuilt after fork or a thread-count change."""
    global _pool
    with _lock:
        if _pool is None or _pool[0] != os.getpid() or _pool[1] != workers:
            if _pool is not None and _pool[0] == os.getpid():
                _pool[2].shutdown(wait=False)
            _pool = (os.getpid(), workers, ThreadPoolExecutor(workers, "sparse-train-expert", _single_threaded))
        return _pool[2]


def balanced_parts(sizes: Sequence[int], parts: int) -> list[list[int]]:
    """Indices of non-zero `sizes` split into at most `parts` lists of about equal total size.

    Largest first onto the lightest part (LPT); each part is returned in ascending index order,
    so a part's experts run in the same order as a sequential loop would run them.
    """
    load = [0] * parts
    members: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted((i for i, n in enumerate(sizes) if n), key=lambda i: -sizes[i]):
        lightest = min(range(parts), key=load.__getitem__)
        members[lightest].append(i)
        load[lightest] += sizes[i]
    return [sorted(m) for m in members if m]


def expert_workers(device: torch.device) -> int:
    """How many expert groups to run concurrently: the caller's intra-op threads on CPU, else 1."""
    return max(1, torch.get_num_threads()) if device.type == "cpu" else 1


def _without_autograd(fn: Callable[[int, list[int]], T], i: int, part: list[int]) -> T:
    with torch.no_grad():  # grad mode is per thread; kernel bodies never record a graph
        return fn(i, part)


def run_parts(fn: Callable[[int, list[int]], T], parts: list[list[int]], workers: int) -> list[T]:
    """fn(part_index, experts) for every part: inline for one part, else on a pool of `workers`."""
    if len(parts) <= 1:
        return [fn(i, p) for i, p in enumerate(parts)]
    pool = _executor(workers)
    futures = [pool.submit(_without_autograd, fn, i, p) for i, p in enumerate(parts)]
    return [f.result() for f in futures]
