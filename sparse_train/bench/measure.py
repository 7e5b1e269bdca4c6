"""Measuring primitives for `sparse-train bench`: interleaved median timings and peak activation memory.

Timing: each candidate runs `warmup` times, then the candidates take turns for `repeats`
rounds (A B C, A B C, ...), so slow drift of the machine (thermal, other load) hits all of
them alike; the median of each one's rounds is reported.

Memory: the PyTorch profiler records every allocation and free with its address. The peak of
the running sum, leaving out the allocations that end up as the parameters' `.grad`, is the
peak memory of everything else a forward+backward allocated: activations, saved tensors and
temporaries. That is "peak above what the parameters and their gradients occupy", on CPU and
CUDA alike.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Iterable

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_median_ms(
    candidates: dict[str, Callable[[], None]],
    *,
    repeats: int,
    warmup: int,
    device: torch.device,
    min_round_ms: float = 0.0,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median ms per call of each candidate. With `min_round_ms`, a round calls a candidate as
    many times as fill that long (timeit's method: calls of microseconds are otherwise below
    the timer's and the garbage collector's noise) and reports the mean per call. `clock`
    returns seconds; tests pass a fake one to check the arithmetic on known timings."""
    calls = dict.fromkeys(candidates, 1)
    for name, fn in candidates.items():
        for _ in range(warmup):
            fn()
        if min_round_ms > 0:
            start = clock()
            fn()
            one_ms = max((clock() - start) * 1e3, 1e-4)
            calls[name] = max(1, int(min_round_ms / one_ms))
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            gc.collect()
            _sync(device)
            start = clock()
            for _ in range(calls[name]):
                fn()
            _sync(device)
            times[name].append((clock() - start) * 1e3 / calls[name])
    return {name: statistics.median(values) for name, values in times.items()}


def peak_activation_mb(step: Callable[[], None], params: Iterable[torch.nn.Parameter]) -> float:
    """Peak MiB allocated during `step` (a forward+backward), not counting the gradients it leaves."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    params = list(params)
    for p in params:
        p.grad = None
    gc.collect()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, profile_memory=True) as prof:
        step()
    grad_ptrs = {p.grad.data_ptr() for p in params if p.grad is not None}
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            fields = node.extra_fields
            events.append((node.start_time_ns, fields.alloc_size, fields.ptr))
        stack.extend(node.children)
    events.sort(key=lambda e: e[0])
    current = peak = 0
    for _, size, ptr in events:
        if ptr in grad_ptrs and size > 0:
            continue  # the gradient buffers themselves are not activation memory
        current += size
        peak = max(peak, current)
    return peak / 2**20
