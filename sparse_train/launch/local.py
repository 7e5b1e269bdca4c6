"""Run a function in N local processes (gloo on CPU), as torchrun would, and collect the results.

Used by the benchmarks and the multi-process tests.

Each process gets torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT) and
one intra-op thread. `fn(*args)` runs in every process; whatever it returns (picklable) comes
back per rank. An exception on any rank fails the call with that rank's traceback; a hang
fails it after `timeout` seconds instead of blocking the test run.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import traceback
from collections.abc import Callable
from typing import Any

# How run_ranks starts its processes. "spawn": a fresh interpreter per rank, as torchrun gives,
# and what a measurement of a process's memory or allocator wants. The multi-process tests use
# "forkserver" (tests/distributed/conftest.py): each rank forks from one server that imported
# torch and the trainer once, which saves seconds of imports per rank on a small machine. A
# forked rank sees the environment of the server's start, not of the call.
START_METHOD = "spawn"
FORKSERVER_PRELOAD = ["sparse_train.train.trainer"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn: Callable[..., Any], rank: int, world_size: int, port: int, queue, args: tuple) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "SPARSE_TRAIN_DIST_TIMEOUT": "60",
        }
    )
    succeeded = False
    try:
        import torch

        torch.set_num_threads(1)
        # plain pickle: tensors travel as bytes, not as shared memory that dies with this process
        queue.put((rank, True, pickle.dumps(fn(*args))))
        succeeded = True
    except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
        queue.put((rank, False, traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            if succeeded:
                # A rank that closes its sockets while a peer is still reading the last collective's
                # data can reset that connection ("Connection closed by peer" on the peer): leave
                # together. Its result is already queued, so a failing barrier changes nothing.
                try:
                    dist.barrier()
                except Exception:  # noqa: BLE001
                    pass
            dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 180) -> list[Any]:
    """fn(*args) on `world_size` new ranks (START_METHOD); their return values, by rank."""
    ctx = mp.get_context(START_METHOD)
    if START_METHOD == "forkserver":
        ctx.set_forkserver_preload(FORKSERVER_PRELOAD)
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, queue, args)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    failures: list[str] = []
    try:
        for _ in range(world_size):
            rank, ok, value = queue.get(timeout=timeout)
            if ok:
                results[rank] = pickle.loads(value)
            else:
                failures.append(f"rank {rank}:\n{value}")
                break
    except Exception as err:  # queue.Empty: a rank hung or died without reporting
        failures.append(f"no result from ranks {sorted(set(range(world_size)) - set(results))}: {err!r}")
    finally:
        for p in procs:
            p.join(timeout=5 if not failures else 1)
            if p.is_alive():
                p.kill()
    if failures:
        raise AssertionError("distributed run failed\n" + "\n".join(failures))
    return [results[r] for r in range(world_size)]
