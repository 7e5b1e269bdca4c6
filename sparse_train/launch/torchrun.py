"""`sparse-train launch`: a checked front end to torchrun.

The layout is validated for the job's world size in the launching process, so a bad layout is
a one-line error (exit status 2) before any worker or process group starts. Then the process
replaces itself with `python -m torch.distributed.run ... -m sparse_train <command>`: signals
and exit status are torchrun's. One node without --master-addr uses torchrun's --standalone
rendezvous (a free port on localhost).
"""

from __future__ import annotations

import argparse
import sys

from sparse_train.config import load_config
from sparse_train.launch.train_entry import TrainRequest
from sparse_train.parallel.dims import ParallelDims


def validate_launch(request: TrainRequest, world_size: int) -> None:
    """Raise ConfigError if the training request's config cannot run on `world_size` ranks."""
    cfg = load_config(request.config, request.overrides)
    ParallelDims.from_config(cfg.parallel, world_size).check_model(cfg)


def torchrun_argv(args: argparse.Namespace, command: list[str]) -> list[str]:
    argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc_per_node}"]
    if args.nnodes == 1 and args.master_addr is None:
        argv.append("--standalone")
    else:
        argv += [
            f"--nnodes={args.nnodes}",
            f"--node-rank={args.node_rank}",
            f"--master-addr={args.master_addr or '127.0.0.1'}",
            f"--master-port={args.master_port}",
        ]
    if args.max_restarts:
        argv.append(f"--max-restarts={args.max_restarts}")
    return [*argv, "-m", "sparse_train", *command]
