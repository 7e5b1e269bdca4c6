"""`sparse-train launch`: check the layout for the job's ranks, then become torchrun (or run on Ray)."""

from __future__ import annotations

import argparse
import os
import sys

from sparse_train.errors import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    launch = subparsers.add_parser(
        "launch",
        help="run a command on N processes per node with torchrun (e.g. launch --nproc-per-node 4 train ...), "
        "or on N Ray workers (launch --ray --num-workers 4 train ...)",
    )
    launch.set_defaults(run=run)
    launch.add_argument("--nproc-per-node", type=int, help="torchrun: processes on this node (GPUs or CPU ranks)")
    launch.add_argument("--nnodes", type=int, default=1, help="nodes in the job")
    launch.add_argument("--node-rank", type=int, default=0, help="this node's index, 0..nnodes-1")
    launch.add_argument("--master-addr", default=None, help="address of node 0 (multi-node); default localhost")
    launch.add_argument("--master-port", type=int, default=29500, help="port on node 0 (multi-node)")
    launch.add_argument("--max-restarts", type=int, default=0, help="restart all workers this often after a failure")
    launch.add_argument("--ray", action="store_true", help="run on Ray workers (Ray Train) instead of torchrun")
    launch.add_argument(
        "--address", default=None, help="--ray: auto (a cluster on this host) or HOST:PORT; default: a local one"
    )
    launch.add_argument("--num-workers", type=int, help="--ray: workers (ranks) in the job")
    launch.add_argument("--cpus-per-worker", type=float, default=1.0, help="--ray: CPUs each worker reserves")
    launch.add_argument("--gpus-per-worker", type=float, default=0.0, help="--ray: GPUs each worker reserves")
    launch.add_argument(
        "--max-failures",
        type=int,
        default=0,
        help="--ray: restart the worker group this often after a worker or node dies",
    )
    launch.add_argument(
        "--placement",
        default="PACK",
        choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"],
        help="--ray: how workers are placed on nodes (STRICT_SPREAD: one per node)",
    )
    launch.add_argument(
        "launch_command", nargs=argparse.REMAINDER, metavar="command", help="the sparse-train command, e.g. train ..."
    )


def run(args: argparse.Namespace) -> int:
    from sparse_train.cli.train import request_from_args
    from sparse_train.launch.torchrun import torchrun_argv, validate_launch

    command = [a for a in args.launch_command if a != "--"]
    if not command:
        raise UsageError(
            "sparse-train launch: name the command to run, e.g. launch --nproc-per-node 2 train --config ..."
        )
    parsed = args.parse_command(command)  # the whole command line is checked here, before any worker starts
    request = request_from_args(parsed) if parsed.command == "train" else None
    restarts = args.max_failures if args.ray else args.max_restarts
    if restarts and (request is None or request.resume != "auto"):
        raise UsageError("sparse-train launch: restarts resume the run: the command must be train ... --resume auto")
    if args.ray:
        return _run_on_ray(args, request, parsed.command)
    if args.nproc_per_node is None:
        raise UsageError("sparse-train launch: --nproc-per-node is required (or --ray --num-workers N)")
    if args.nproc_per_node < 1 or args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        raise UsageError("sparse-train launch: --nproc-per-node >= 1, --nnodes >= 1 and 0 <= --node-rank < --nnodes")
    if request is not None:
        validate_launch(request, args.nproc_per_node * args.nnodes)
    argv = torchrun_argv(args, command)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)
    return 0  # not reached


def _run_on_ray(args: argparse.Namespace, request, command_name: str) -> int:
    from sparse_train.launch import ray_launch
    from sparse_train.launch.torchrun import validate_launch

    if request is None:
        raise UsageError(f"sparse-train launch --ray: runs train, not {command_name}")
    if args.num_workers is None or args.num_workers < 1 or args.cpus_per_worker <= 0 or args.gpus_per_worker < 0:
        raise UsageError("sparse-train launch --ray: --num-workers >= 1, --cpus-per-worker > 0, --gpus-per-worker >= 0")
    validate_launch(request, args.num_workers)
    job = ray_launch.RayJob(
        args.num_workers, args.cpus_per_worker, args.gpus_per_worker, args.address, args.max_failures, args.placement
    )
    try:
        return ray_launch.run(job, request)
    except ray_launch.LaunchError as err:
        raise UsageError(f"sparse-train launch --ray: {err}") from None
