"""`sparse-train dry-run`: ranks of a planned layout run on fake CUDA tensors, to find what
would stop or stall a GPU run before any GPU is rented (sparse_train.dryrun, docs/gpu.md)."""

from __future__ import annotations

import argparse
import json
import sys

from sparse_train.cli.common import add_config_args, add_json_flag, on_fake_cuda
from sparse_train.errors import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "dry-run",
        help="run a layout's step on fake CUDA tensors: host reads, CPU tensors, collectives on the wrong device",
    )
    p.set_defaults(run=run)
    add_config_args(p)
    p.add_argument("--world", type=int, required=True, help="ranks of the planned run (the layout's world size)")
    p.add_argument(
        "--rank",
        type=int,
        action="append",
        help="rank to run (repeatable; default: the first rank of each pipeline stage)",
    )
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="the planned run's device (default cuda)")
    p.add_argument("--backend", help="process-group backend of the planned run (default: the trainer's for the device)")
    p.add_argument("--devices-per-node", type=int, default=8, help="GPUs per node (LOCAL_RANK = rank %% this)")
    p.add_argument(
        "--measure",
        action="store_true",
        help="also the train step's peak device memory by kind and its FLOPs (in the JSON: step_cost)",
    )
    add_json_flag(p)


def run(args: argparse.Namespace) -> int:
    from sparse_train.config import load_config
    from sparse_train.parallel.dims import ParallelDims

    if args.world < 1 or args.devices_per_node < 1:
        raise UsageError("dry-run: --world and --devices-per-node must be at least 1")
    cfg = load_config(args.config, args.overrides)
    ParallelDims.from_config(cfg.parallel, args.world).check_model(cfg)  # a bad layout fails here, in one line
    if bad := [r for r in args.rank or [] if not 0 <= r < args.world]:
        raise UsageError(f"dry-run: --rank {bad[0]} is outside the world of {args.world} ranks")
    if args.device == "cuda":
        on_fake_cuda(args.argv, args.devices_per_node, "dry-run")
    from sparse_train.dryrun.run import dry_run, stage_ranks

    failed = False
    for rank in args.rank or stage_ranks(cfg, args.world):
        report = dry_run(
            cfg,
            args.world,
            rank,
            device=args.device,
            backend=args.backend,
            devices_per_node=args.devices_per_node,
            measure=args.measure,
        )
        failed |= not report.ok
        print(json.dumps(report.as_dict()))
        if not args.json or not report.ok:  # findings always reach stderr, one line each
            print(report.summary(), file=sys.stderr)
    return 1 if failed else 0
