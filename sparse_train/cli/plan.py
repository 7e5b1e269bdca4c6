"""`sparse-train plan`: the layouts a cluster admits for a model, ranked by predicted throughput,
with their memory per rank, step time and MFU, measured on the real trainer on fake tensors
(sparse_train.plan, docs/scale.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sparse_train.cli.common import add_config_args, add_json_flag, on_fake_cuda
from sparse_train.errors import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan",
        help="choose dp/ep/tp/pp, micro-batch and accumulation for a cluster: memory, step time and MFU per layout",
    )
    p.set_defaults(run=run)
    add_config_args(p)
    p.add_argument("--gpus", type=int, required=True, help="GPUs of the cluster")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--gpu", required=True, help="GPU kind: a name of sparse_train/plan/gpus.yaml, or custom")
    p.add_argument("--gpu-spec", type=Path, help="with --gpu custom: a YAML file of the fields of gpus.yaml")
    p.add_argument("--global-batch-tokens", type=int, help="tokens per step (default: the config's batch)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the config's data.seq_len)")
    p.add_argument(
        "--skew", type=float, default=0.0, help="routing skew: the busiest rank's all-to-all bytes are (1+skew)x"
    )
    p.add_argument("--top", type=int, default=15, help="rows of the table (default 15)")
    p.add_argument("--explain", metavar="LAYOUT", help="the breakdown of one layout (its name, as the table prints)")
    add_json_flag(p)


def run(args: argparse.Namespace) -> int:
    from sparse_train.config import load_config
    from sparse_train.plan.hardware import gpu_spec
    from sparse_train.plan.layouts import candidate_layouts, sequences_per_step
    from sparse_train.plan.search import no_layout

    if args.gpus < 1 or args.gpus_per_node < 1:
        raise UsageError("plan: --gpus and --gpus-per-node must be at least 1")
    if args.gpus % args.gpus_per_node and args.gpus > args.gpus_per_node:
        raise UsageError(f"plan: --gpus {args.gpus} is not a whole number of {args.gpus_per_node}-GPU nodes")
    if args.skew < 0:
        raise UsageError(f"plan: --skew must be >= 0, got {args.skew}")
    gpu = gpu_spec(args.gpu, args.gpu_spec)
    overrides = list(args.overrides) + ([f"data.seq_len={args.seq_len}"] if args.seq_len else [])
    cfg = load_config(args.config, overrides)
    seq_len = cfg.data.seq_len
    tokens = args.global_batch_tokens or cfg.train.batch_size * cfg.train.grad_accum * seq_len
    if tokens < 1:
        raise UsageError(f"plan: --global-batch-tokens must be positive, got {tokens}")
    sequences = sequences_per_step(tokens, seq_len)
    if not candidate_layouts(cfg, args.gpus, args.gpus_per_node, sequences):  # before the re-run below
        raise UsageError(no_layout(cfg, args.gpus, args.gpus_per_node, sequences, {}))
    on_fake_cuda(args.argv, min(args.gpus, args.gpus_per_node), "plan")  # probes run on fake CUDA
    from sparse_train.plan.cost import MEMORY_RESERVE
    from sparse_train.plan.search import make_plan, smallest_cluster_estimate

    def log(msg: str) -> None:
        if not args.json:
            print(msg, file=sys.stderr, flush=True)

    plan = make_plan(cfg, args.gpus, args.gpus_per_node, gpu, sequences, skew=args.skew, log=log)
    if args.explain:
        chosen = [p for p in plan.predictions if p.layout.name() == args.explain]
        if not chosen:
            raise UsageError(f"plan: --explain {args.explain}: not a layout this cluster admits (the table names them)")
        print(json.dumps(chosen[0].breakdown(), indent=2))
        return 0
    if plan.best is None:
        closest = min(plan.predictions, key=lambda p: p.peak_bytes)
        needed = smallest_cluster_estimate(plan)
        hint = (
            f"; about {needed} GPUs would hold it (estimate: parameters, optimizer state and sharded gradients "
            f"shrink with the data-parallel ranks)"
            if needed
            else "; its activations alone do not fit: a smaller micro-batch, sequence or recomputation would"
        )
        raise UsageError(
            f"plan: no layout of {args.gpus} {gpu.name} GPUs fits this model: the closest, {closest.layout.name()}, "
            f"needs {closest.peak_bytes / 1e9:.1f} GB per rank, {gpu.memory_gb * (1 - MEMORY_RESERVE):.1f} usable{hint}"
        )
    print(json.dumps([p.summary() for p in plan.predictions]))
    if not args.json:
        _table(plan, args.top)
    return 0


def _table(plan, top: int) -> None:  # type: ignore[no-untyped-def]
    rows = [p.summary() for p in plan.predictions[:top]]
    head = f"{'layout':<44} {'fits':>4} {'GB/rank':>8} {'step s':>8} {'tokens/s':>11} {'MFU':>6}"
    print(head, file=sys.stderr)
    for row in rows:
        print(
            f"{row['name']:<44} {'yes' if row['fits'] else 'no':>4} {row['peak_mem_gb_per_rank']:>8.1f} "
            f"{row['step_time_s']:>8.3f} {row['tokens_per_s']:>11,.0f} {row['mfu']:>6.1%}",
            file=sys.stderr,
        )
    fitting = sum(p.fits for p in plan.predictions)
    print(
        f"{len(plan.predictions)} layouts the trainer accepts, {fitting} fit; "
        f"{sum(plan.rejected.values())} refused by its validation; "
        f"probes: {', '.join(f'tp={p.tp} ac={p.activation_checkpointing} {p.seconds:.1f}s' for p in plan.probes)}",
        file=sys.stderr,
    )
