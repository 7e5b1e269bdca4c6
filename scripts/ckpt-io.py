#!/usr/bin/env python
"""Checkpoint I/O per rank: bytes read and written and seconds spent saving and resuming, one
JSON line per rank, for an MoE of the given size trained in N local gloo processes.

    flock /tmp/sparse_train_heavy.lock .venv/bin/python scripts/ckpt-io.py --work /tmp/ckpt-io \
        [--experts 32 --expert-hidden 512 --d-model 512 --layers 4 --world 4 --ep 4] [--async-save]

Each rank trains two steps and saves after each (the first save warms up imports and is not
reported); then fresh processes resume from the checkpoint. Bytes are the kernel's per-process
counters (`rchar` / `wchar` of /proc/self/io: everything read or written through system calls,
the page cache included, every thread of the process); `share` is what the manifest says the
rank wrote. `save.blocked_s` is how long the training loop stood still (with --async-save, the
staging copy), `save.published_s` how long until the checkpoint was published.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def _counters() -> dict[str, int]:
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return {"read": int(fields["rchar"]), "written": int(fields["wchar"])}


def _peak_rss_mb() -> float:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


def _measured(fn: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    before, start = _counters(), time.perf_counter()
    result = fn()
    after = _counters()
    return result, {"seconds": time.perf_counter() - start, **{k: after[k] - before[k] for k in after}}


def _data():
    from sparse_train.data.dataset import TokenData

    rng = np.random.default_rng(0)
    return TokenData(
        rng.integers(0, 256, 200_000).astype(np.uint16), rng.integers(0, 256, 20_000).astype(np.uint16), "random"
    )


def _save_rank(overrides: list[str], run_dir: str) -> dict[str, Any]:
    from sparse_train.config import load_config
    from sparse_train.train.trainer import Trainer

    trainer = Trainer(load_config(None, overrides), Path(run_dir), data=_data(), log=lambda msg: None)
    try:
        for _ in range(2):  # the first save warms up (imports, the async groups); the second is reported
            trainer.train_step()
            start = time.perf_counter()
            _, blocked = _measured(trainer.save)
            # (a tree from before asynchronous saves has nothing to wait for: the script measures those too)
            _, waited = _measured(getattr(trainer, "wait_for_checkpoint", lambda: None))
        return {
            "rank": trainer.rank,
            "save": {
                "read": blocked["read"] + waited["read"],
                "written": blocked["written"] + waited["written"],
                "blocked_s": round(blocked["seconds"], 3),
                "published_s": round(time.perf_counter() - start, 3),
            },
        }
    finally:
        trainer.close()


def _resume_rank(overrides: list[str], run_dir: str) -> dict[str, Any]:
    from sparse_train.config import load_config
    from sparse_train.train.trainer import Trainer

    spent: list[dict[str, float]] = []
    find, load = Trainer._find_resume, Trainer._load

    def measured(method):
        def wrapper(self, *args):
            result, cost = _measured(lambda: method(self, *args))
            spent.append(cost)
            return result

        return wrapper

    Trainer._find_resume, Trainer._load = measured(find), measured(load)  # what resuming costs, nothing else
    trainer = Trainer(load_config(None, overrides), Path(run_dir), data=_data(), resume="auto", log=lambda m: None)
    trainer.close()
    return {
        "rank": trainer.rank,
        "resume": {"read": sum(c["read"] for c in spent), "seconds": round(sum(c["seconds"] for c in spent), 3)},
        "peak_rss_mb": round(_peak_rss_mb()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch directory (the run is written here)")
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--expert-hidden", type=int, default=512)
    parser.add_argument("--world", type=int, default=4, help="processes")
    parser.add_argument("--ep", type=int, default=4)
    parser.add_argument("--async-save", action="store_true", help="checkpoint.async_save=true")
    args = parser.parse_args()

    from sparse_train.launch.local import run_ranks
    from sparse_train.train import checkpoint as ckpt

    overrides = [
        f"model.d_model={args.d_model}",
        f"model.n_layers={args.layers}",
        "model.n_heads=8",
        "model.max_seq_len=64",
        f"moe.num_experts={args.experts}",
        f"moe.expert_hidden={args.expert_hidden}",
        "moe.kernel_backend=torch",
        "data.seq_len=64",
        "train.batch_size=4",
        "train.steps=2",
        "checkpoint.every=0",
        "checkpoint.save_final=false",
        f"parallel.ep={args.ep}",
        "logging.progress=false",
        "logging.tensorboard=false",
        "logging.plots=false",
        *(["checkpoint.async_save=true"] if args.async_save else []),  # absent: also runs on older trees
    ]
    run = args.work / "run"
    shutil.rmtree(run, ignore_errors=True)
    saves = run_ranks(_save_rank, args.world, overrides, str(run), timeout=3600)
    resumes = run_ranks(_resume_rank, args.world, overrides, str(run), timeout=3600)
    path = ckpt.list_checkpoints(run / "checkpoints")[0].path
    files = json.loads((path / ckpt.MANIFEST).read_text())["files"]
    total = sum(m["bytes"] for m in files.values())
    for save, resume in zip(saves, resumes, strict=True):
        share = sum(m["bytes"] for m in files.values() if m["rank"] == save["rank"])
        record = {
            "experts": args.experts,
            "checkpoint_bytes": total,
            "world": args.world,
            "ep": args.ep,
            "async_save": args.async_save,
            **save,
            **resume,
            "share": share,
            "resume_read_per_share": round(resume["resume"]["read"] / share, 3),
            "save_read_per_share": round(save["save"]["read"] / share, 4),
            "save_written_per_share": round(save["save"]["written"] / share, 3),
        }
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
