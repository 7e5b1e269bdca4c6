"""`sparse-train` (and `python -m sparse_train`): train, eval, generate, config.

Errors the user can fix (config, data, checkpoints, arguments) end the process with exit status
2 and one line on stderr naming the problem; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from sparse_train.configtypes import ConfigError, field_help

USER_ERROR = 2


class UsageError(Exception):
    """A bad command line; exit status 2."""


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's default prints usage too)
        raise UsageError(f"{self.prog}: {message}")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML recipe (e.g. configs/tiny-moe.yaml); omitted = built-in defaults")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config field, e.g. --set train.steps=100 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="sparse-train", description="Train sparse (MoE / FFF) language models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)

    train = sub.add_parser("train", help="train a model from a config")
    _add_config_args(train)
    train.add_argument("--run-dir", help="output directory (default runs/CONFIG_NAME/TIMESTAMP)")
    train.add_argument("--resume", help="'auto' (newest complete checkpoint in the run dir) or a checkpoint path")
    train.add_argument(
        "--init-from",
        help="start from these weights (HF directory, upcycled or trained sparse_train run); the model, moe, "
        "router and fff sections come from it, the rest from --config, then --set",
    )

    launch = sub.add_parser(
        "launch",
        help="run a command on N processes per node with torchrun (e.g. launch --nproc-per-node 4 train ...), "
        "or on N Ray workers (launch --ray --num-workers 4 train ...)",
    )
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

    ev = sub.add_parser("eval", help="validation loss of a checkpoint, as JSON")
    ev.add_argument("--checkpoint", required=True, help="checkpoint directory or run directory")
    ev.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override fields of the checkpoint's config, e.g. data.path or train.eval_batches",
    )

    gen = sub.add_parser("generate", help="generate text from a checkpoint")
    gen.add_argument("--checkpoint", required=True, help="checkpoint directory or run directory")
    gen.add_argument("--prompt", required=True, help="text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument("--greedy", action="store_true", help="always take the most likely token")
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass")
    gen.add_argument("--seed", type=int, default=0)

    bench = sub.add_parser("bench", help="benchmarks that print JSON (one object per measured case)")
    bench_sub = bench.add_subparsers(dest="bench", required=True, parser_class=_ArgumentParser)
    moe = bench_sub.add_parser("moe-layer", help="MoE layer vs the dense limit, HF Mixtral and DeepSpeed-MoE")
    moe.add_argument("--json", action="store_true", help="only the JSON lines on stdout (no table on stderr)")
    moe.add_argument(
        "--shapes",
        nargs="+",
        default=["mixtral-like", "fine-grained", "skewed"],
        choices=["mixtral-like", "fine-grained", "skewed"],
    )
    moe.add_argument("--tokens", type=int, help="override the token count of every shape (quick runs)")
    moe.add_argument("--repeats", type=int, default=5)
    moe.add_argument("--warmup", type=int, default=2)
    moe.add_argument("--seed", type=int, default=0)
    moe.add_argument("--peers", default="hf,deepspeed", help="comma list of hf, deepspeed; empty for none")

    disp = bench_sub.add_parser("dispatch", help="expert-parallel all-to-all of the tiny model on gloo: bytes, time")
    disp.add_argument("--json", action="store_true", help="only the JSON lines on stdout (no table on stderr)")
    disp.add_argument("--ep", type=int, nargs="+", default=[2, 4], help="expert-parallel sizes (one process each)")
    disp.add_argument("--steps", type=int, default=12, help="optimizer steps per case, warm-up included")
    disp.add_argument("--warmup", type=int, default=2)
    disp.add_argument("--compare-no-dedup", action="store_true", help="also run each EP size without deduplication")
    disp.add_argument("--config", help="model recipe (default: configs/tiny-moe.yaml of this checkout)")

    infer = bench_sub.add_parser("fff-infer", help="hard FFF inference vs a dense FFN of the same width")
    infer.add_argument("--json", action="store_true", help="only the JSON lines on stdout (no table on stderr)")
    infer.add_argument("--depths", type=int, nargs="+", default=[4, 6, 8, 10])
    infer.add_argument("--batches", type=int, nargs="+", default=[1, 64, 4096])
    infer.add_argument("--repeats", type=int, default=7)
    infer.add_argument("--warmup", type=int, default=2)
    infer.add_argument("--seed", type=int, default=0)
    infer.add_argument("--peers", default="fastfeedforward", help="fastfeedforward, or empty for none")

    repro = bench_sub.add_parser("fff-repro", help="FFF vs FFF + load balancing (+ master leaf) on sklearn digits")
    repro.add_argument("--json", action="store_true", help="only the JSON lines on stdout (no table on stderr)")
    repro.add_argument("--depths", type=int, nargs="+", default=[3, 5])
    repro.add_argument("--seeds", type=int, default=5, help="runs per (depth, variant), seeds 0..N-1")
    repro.add_argument("--epochs", type=int, default=150)

    up = sub.add_parser("upcycle", help="turn a dense checkpoint (HF directory or sparse_train run) into an MoE or FFF")
    up.add_argument("--from", dest="source", required=True, help="HF model directory or sparse_train checkpoint/run")
    up.add_argument("--to", dest="target", required=True, help="output directory (must not exist; see --overwrite)")
    up.add_argument(
        "--method",
        required=True,
        choices=["copy", "split", "moefication", "cmoe", "fff"],
        help="copy: each expert the dense FFN; split: its neurons partitioned; moefication, cmoe, "
        "fff: neurons carved by activations on calibration tokens (fff: tree leaves)",
    )
    up.add_argument("--num-experts", type=int, required=True, help="routed experts (fff: leaves, a power of two)")
    up.add_argument("--top-k", type=int, required=True, help="experts (fff: leaves) selected per token")
    up.add_argument("--layers", type=int, nargs="+", help="blocks to convert (default: all)")
    up.add_argument(
        "--partition",
        default="contiguous",
        choices=["contiguous", "random", "kmeans"],
        help="split: how neurons are grouped into experts",
    )
    up.add_argument(
        "--granularity",
        type=int,
        default=None,
        help="copy/split: slices each dense FFN is cut into, each copied into E/g experts (default: copy 1, split E)",
    )
    up.add_argument("--num-shared", type=int, default=1, help="cmoe: shared experts from the highest-rate neurons")
    up.add_argument("--noise", type=float, default=0.0, help="copy: relative Gaussian noise on each expert")
    up.add_argument(
        "--drop-ratio",
        type=float,
        default=0.0,
        help="copy: share of each expert's neurons re-initialised (Drop-Upcycling)",
    )
    up.add_argument(
        "--calib",
        type=Path,
        default=None,
        help="moefication/cmoe/fff: calibration text (file, directory, .jsonl) or token ids (.bin); "
        "default: the Python standard library",
    )
    up.add_argument("--calib-tokens", type=int, default=8192, help="calibration tokens read (a quarter held out)")
    up.add_argument("--seed", type=int, default=0)
    up.add_argument("--format", default="native", choices=["native", "hf"], help="output: sparse_train run or HF")
    up.add_argument("--overwrite", action="store_true", help="replace --to if it exists")

    conv = sub.add_parser("convert", help="HF directory <-> sparse_train checkpoint, without changing the model")
    conv.add_argument("--from", dest="source", required=True, help="HF model directory or sparse_train checkpoint/run")
    conv.add_argument("--to", dest="target", required=True, help="output directory (must not exist; see --overwrite)")
    conv.add_argument("--format", required=True, choices=["native", "hf"], help="what to write")
    conv.add_argument("--overwrite", action="store_true", help="replace --to if it exists")

    ck = sub.add_parser("ckpt", help="inspect or convert checkpoints")
    ck_sub = ck.add_subparsers(dest="ckpt_command", required=True, parser_class=_ArgumentParser)
    ck_info = ck_sub.add_parser("info", help="a checkpoint's format, step, layout and tensors, as JSON")
    ck_info.add_argument("path", type=Path, help="a checkpoint directory, or a run directory (its newest)")
    ck_conv = ck_sub.add_parser("convert", help="a checkpoint's whole weights (any layout) as one safetensors file")
    ck_conv.add_argument("path", type=Path, help="a checkpoint directory, or a run directory (its newest)")
    ck_conv.add_argument("--to", dest="target", type=Path, required=True, help="output file, e.g. model.safetensors")
    ck_conv.add_argument("--overwrite", action="store_true", help="replace --to if it exists")

    sw = sub.add_parser("sweep", help="scaling-law sweeps: run a grid of trainings, fit laws, plot the frontier")
    sw_sub = sw.add_subparsers(dest="sweep_command", required=True, parser_class=_ArgumentParser)
    sw_run = sw_sub.add_parser("run", help="run (or finish) every trial of a sweep spec")
    sw_run.add_argument("spec", type=Path, help="sweep YAML, e.g. configs/sweeps/moe-vs-dense.yaml")
    sw_run.add_argument("--out", type=Path, required=True, help="results directory (reruns skip finished trials)")
    sw_run.add_argument("--ray-address", default=None, help="auto or HOST:PORT; default: a local Ray instance")
    sw_run.add_argument("--executor", default="ray", choices=["ray", "local"], help="local: subprocesses, no Ray")
    sw_run.add_argument("--max-parallel", type=int, default=None, help="trials at once (default: CPUs / per-trial)")
    sw_run.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs (and torch threads) per trial")
    sw_run.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs Ray assigns each trial (ray executor)")
    sw_fit = sw_sub.add_parser("fit", help="fit a scaling law to a sweep's results (JSON)")
    sw_fit.add_argument("dir", type=Path, help="the sweep's --out directory")
    sw_fit.add_argument("--law", default="chinchilla", choices=["chinchilla", "moe"])
    sw_fit.add_argument("--out", type=Path, default=None, help="where to write the fit (default DIR/fit-LAW.json)")
    sw_fit.add_argument("--bootstrap", type=int, default=100, help="resamples for the 95%% intervals")
    sw_fit.add_argument("--metric", default="final_val_loss", choices=["final_val_loss", "final_train_loss"])
    sw_fit.add_argument(
        "--by-family",
        action="store_true",
        help="fit each model family (dense, each E and G) on its own and report where each "
        "crosses dense at equal active parameters (DIR/fit-LAW-families.json)",
    )
    sw_opt = sw_sub.add_parser("optimal", help="compute-optimal N, D (and E, G) for a FLOP budget, from a fit")
    sw_opt.add_argument("dir", type=Path, help="the sweep's --out directory (with a fit)")
    sw_opt.add_argument("--flops", type=float, required=True, help="training budget, e.g. 1e21")
    sw_opt.add_argument("--law", default=None, choices=["chinchilla", "moe"], help="which fit (default: moe if fitted)")
    sw_opt.add_argument(
        "--max-experts", type=int, default=None, help="moe: largest E considered (default: the sweep's)"
    )
    sw_plot = sw_sub.add_parser("plot", help="PNG and SVG figures of a sweep (DIR/plots)")
    sw_plot.add_argument("dir", type=Path, help="the sweep's --out directory")
    sw_plot.add_argument(
        "--law", default=None, choices=["chinchilla", "moe"], help="the fit drawn (default: moe if fitted)"
    )

    plot = sub.add_parser("plot-runs", help="loss curves of several runs in one figure (PNG and SVG)")
    plot.add_argument(
        "runs",
        nargs="+",
        metavar="LABEL=RUN_DIR[@OFFSET]",
        help="a run's label and directory; @OFFSET shifts its steps (a continued run)",
    )
    plot.add_argument("--out", required=True, type=Path, help="output path without suffix: writes OUT.png, OUT.svg")
    plot.add_argument("--title", default=None)

    sub.add_parser("info", help="versions, devices, optional integrations and runtime settings, as JSON")

    cfg = sub.add_parser("config", help="print the resolved config (YAML), or every field with its help")
    _add_config_args(cfg)
    cfg.add_argument("--fields", action="store_true", help="list every field, its default and meaning")
    return parser


def _default_run_dir(config_path: str | None) -> Path:
    name = Path(config_path).stem if config_path else "default"
    return Path("runs") / name / time.strftime("%Y%m%d-%H%M%S")


def cmd_train(args: argparse.Namespace) -> int:
    from sparse_train.config import load_config
    from sparse_train.train.trainer import Trainer

    init_weights = None
    if args.init_from:
        cfg, init_weights = _init_from(args)
    else:
        cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.run_dir) if args.run_dir else _default_run_dir(args.config)
    if args.resume is not None and args.run_dir is None and args.resume == "auto":
        raise UsageError("sparse-train train: --resume auto needs --run-dir (the run to continue)")
    trainer = Trainer(cfg, run_dir, resume=args.resume, init_weights=init_weights)
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    if trainer.is_main:
        print(format_summary(summary))
    return 0


MODEL_SECTIONS = ("model", "moe", "router", "fff")


def _init_from(args: argparse.Namespace):
    """The run's config (model sections from the source, the rest from --config, --set last) and the
    source's weights."""
    from sparse_train.config import Config, config_from_dict, load_config
    from sparse_train.configtypes import apply_override, parse_override
    from sparse_train.upcycle.io import load_source

    source = load_source(Path(args.init_from))
    data = load_config(args.config, []).to_dict()
    data.update({section: source.cfg.to_dict()[section] for section in MODEL_SECTIONS})
    data["data"]["seq_len"] = min(data["data"]["seq_len"], source.cfg.model.max_seq_len)
    if source.tokenizer_dir is not None:  # the checkpoint's own tokenizer reads the training data
        data["data"].update(tokenizer="hf", tokenizer_path=str(source.tokenizer_dir))
    for text in args.overrides:
        parts, value = parse_override(text)
        apply_override(data, Config, parts, value)
    return config_from_dict(data), source.state


def cmd_launch(args: argparse.Namespace) -> int:
    """Validate the layout for the job's ranks, then become torchrun (or run the job on Ray)."""
    import os

    from sparse_train.launch.torchrun import torchrun_argv, validate_launch

    command = [a for a in args.launch_command if a != "--"]
    if not command:
        raise UsageError(
            "sparse-train launch: name the command to run, e.g. launch --nproc-per-node 2 train --config ..."
        )
    parsed = build_parser().parse_args(command)
    restarts = args.max_failures if args.ray else args.max_restarts
    if restarts and (parsed.command != "train" or parsed.resume != "auto"):
        raise UsageError("sparse-train launch: restarts resume the run: the command must be train ... --resume auto")
    if args.ray:
        return _launch_ray(args, command, parsed)
    if args.nproc_per_node is None:
        raise UsageError("sparse-train launch: --nproc-per-node is required (or --ray --num-workers N)")
    if args.nproc_per_node < 1 or args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        raise UsageError("sparse-train launch: --nproc-per-node >= 1, --nnodes >= 1 and 0 <= --node-rank < --nnodes")
    validate_launch(parsed, args.nproc_per_node * args.nnodes)
    argv = torchrun_argv(args, command)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)
    return 0  # not reached


def _launch_ray(args: argparse.Namespace, command: list[str], parsed: argparse.Namespace) -> int:
    from sparse_train.config import load_config
    from sparse_train.launch import ray_launch
    from sparse_train.launch.torchrun import validate_launch

    if parsed.command != "train":
        raise UsageError(f"sparse-train launch --ray: runs train, not {parsed.command}")
    if args.num_workers is None or args.num_workers < 1 or args.cpus_per_worker <= 0 or args.gpus_per_worker < 0:
        raise UsageError("sparse-train launch --ray: --num-workers >= 1, --cpus-per-worker > 0, --gpus-per-worker >= 0")
    validate_launch(parsed, args.num_workers)
    # Every worker and the driver must agree on the run directory (the driver follows its metrics).
    run_dir = Path(parsed.run_dir or _default_run_dir(parsed.config)).resolve()
    argv = [*command, "--run-dir", str(run_dir)] if parsed.run_dir is None else command
    steps = load_config(parsed.config, parsed.overrides).train.steps
    job = ray_launch.RayJob(
        args.num_workers, args.cpus_per_worker, args.gpus_per_worker, args.address, args.max_failures, args.placement
    )
    try:
        return ray_launch.run(job, argv, run_dir, steps)
    except ray_launch.RayLaunchError as err:
        raise UsageError(f"sparse-train launch --ray: {err}") from None


def format_summary(s) -> str:
    def loss(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    lines = [
        f"trained {s.steps} steps  ({s.params.get('total', 0):,} parameters, "
        f"{s.params.get('active', 0):,} active per token)",
        f"  loss          {loss(s.first_loss)} (first step) -> {loss(s.last_loss)} (last step)",
        f"  val loss      {loss(s.val_loss)}",
        f"  throughput    {s.tokens_per_s:,.0f} tokens/s",
    ]
    if s.load_imbalance:
        balance = ", ".join(f"{k} {v:.2f}" for k, v in s.load_imbalance.items())
        if s.sparse_kind == "fff":
            lines.append(f"  leaf usage    max/mean per FFF layer (1.00 = balanced): {balance}")
        else:
            lines.append(f"  expert load   max/mean per MoE layer (1.00 = balanced): {balance}")
    if s.nonfinite_steps:
        lines.append(f"  skipped       {s.nonfinite_steps} non-finite steps")
    lines += [
        f"  metrics       {s.run_dir / 'metrics.jsonl'}",
        f"  tensorboard   {s.run_dir / 'tb'}   (tensorboard --logdir {s.run_dir / 'tb'})",
        f"  plots         {s.run_dir / 'plots'}",
        f"  checkpoint    {s.checkpoint if s.checkpoint else 'none written'}",
    ]
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> int:
    import math

    from sparse_train.data.dataset import load_token_data, validation_batches
    from sparse_train.inference import load_trained
    from sparse_train.train.loss import lm_loss

    loaded = load_trained(Path(args.checkpoint), args.overrides)
    cfg = loaded.cfg
    data = load_token_data(cfg.data, loaded.tokenizer, cfg.model.vocab_size)
    batches = validation_batches(data.val, cfg.data.seq_len, cfg.train.batch_size, cfg.train.eval_batches)
    import torch

    with torch.no_grad():
        losses = [float(lm_loss(loaded.model(x).logits_BSV, y)) for x, y in batches]
    val = sum(losses) / len(losses)
    print(
        json.dumps(
            {
                "checkpoint": str(loaded.path),
                "step": loaded.step,
                "val_loss": val,
                "val_ppl": math.exp(val),
                "tokens": len(batches) * cfg.train.batch_size * cfg.data.seq_len,
                "data": data.source,
            }
        )
    )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from sparse_train.inference import generate, load_trained

    if args.max_new_tokens < 1:
        raise UsageError("sparse-train generate: --max-new-tokens must be >= 1")
    if not 0.0 < args.top_p <= 1.0:
        raise UsageError("sparse-train generate: --top-p must be in (0, 1]")
    if args.temperature <= 0:
        raise UsageError("sparse-train generate: --temperature must be > 0 (use --greedy for argmax)")
    loaded = load_trained(Path(args.checkpoint))
    prompt_ids = loaded.tokenizer.encode(args.prompt).tolist()
    if not prompt_ids:
        raise UsageError("sparse-train generate: --prompt is empty")
    new_ids = generate(
        loaded.model,
        prompt_ids,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        greedy=args.greedy,
        seed=args.seed,
        stop_id=loaded.tokenizer.eot_id,
    )
    print(args.prompt + loaded.tokenizer.decode(new_ids))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from sparse_train.config import Config, load_config

    if args.fields:
        for name, help_text, default in field_help(Config):
            print(f"{name} = {default!r}\n    {help_text}")
        return 0
    print(load_config(args.config, args.overrides).to_yaml(), end="")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.bench == "fff-infer":
        return _bench_fff_infer(args)
    if args.bench == "fff-repro":
        return _bench_fff_repro(args)
    if args.bench == "dispatch":
        from sparse_train.bench import dispatch

        if args.steps <= args.warmup or args.warmup < 0 or any(ep < 2 for ep in args.ep):
            raise UsageError("sparse-train bench dispatch: --steps > --warmup >= 0 and every --ep >= 2 required")
        config = Path(args.config) if args.config else dispatch.CONFIG
        if not config.is_file():
            raise UsageError(f"sparse-train bench dispatch: no config at {config}; pass --config")
        dispatch.run(
            args.ep,
            config=config,
            steps=args.steps,
            warmup=args.warmup,
            dedup_off=args.compare_no_dedup,
            as_json=args.json,
        )
        return 0
    from sparse_train.bench import moe_layer

    peers = {p for p in args.peers.split(",") if p}
    unknown = peers - {"hf", "deepspeed"}
    if unknown:
        raise UsageError(f"sparse-train bench moe-layer: unknown --peers {sorted(unknown)}; allowed: hf, deepspeed")
    if args.repeats < 1 or args.warmup < 0 or (args.tokens is not None and args.tokens < 1):
        raise UsageError("sparse-train bench moe-layer: --repeats >= 1, --warmup >= 0 and --tokens >= 1 required")
    moe_layer.run(
        args.shapes,
        tokens=args.tokens,
        repeats=args.repeats,
        warmup=args.warmup,
        seed=args.seed,
        peers=peers,
        as_json=args.json,
    )
    return 0


def _bench_fff_infer(args: argparse.Namespace) -> int:
    from sparse_train.bench import fff_infer

    peers = {p for p in args.peers.split(",") if p}
    if peers - {"fastfeedforward"}:
        raise UsageError(f"sparse-train bench fff-infer: unknown --peers {sorted(peers)}; allowed: fastfeedforward")
    if any(d < 1 or 2**d > fff_infer.TOTAL_WIDTH for d in args.depths):
        raise UsageError("sparse-train bench fff-infer: --depths in [1, 12] (leaf width = 4096 / 2^depth >= 1)")
    if any(b < 1 for b in args.batches) or args.repeats < 1 or args.warmup < 0:
        raise UsageError("sparse-train bench fff-infer: --batches >= 1, --repeats >= 1 and --warmup >= 0 required")
    fff_infer.run(
        args.depths,
        args.batches,
        repeats=args.repeats,
        warmup=args.warmup,
        seed=args.seed,
        peers=peers,
        as_json=args.json,
    )
    return 0


def _bench_fff_repro(args: argparse.Namespace) -> int:
    from sparse_train.bench import fff_repro
    from sparse_train.config import MAX_FFF_DEPTH

    if any(not 1 <= d <= MAX_FFF_DEPTH for d in args.depths) or args.seeds < 2 or args.epochs < 1:
        raise UsageError(
            f"sparse-train bench fff-repro: --depths in [1, {MAX_FFF_DEPTH}], --seeds >= 2 (a spread needs two) "
            "and --epochs >= 1 required"
        )
    try:
        fff_repro.load_digits_split(0.2)
    except RuntimeError as err:
        raise UsageError(f"sparse-train bench fff-repro: {err}") from None
    fff_repro.run(args.depths, args.seeds, recipe=fff_repro.Recipe(epochs=args.epochs), as_json=args.json)
    return 0


def cmd_upcycle(args: argparse.Namespace) -> int:
    import json

    from tqdm import tqdm

    from sparse_train.upcycle import hf
    from sparse_train.upcycle.calibration import calibration_tokens, ffn_inputs
    from sparse_train.upcycle.io import check_target, load_source, write_model
    from sparse_train.upcycle.methods import CALIBRATED, UpcycleSpec, upcycle, upcycled_config
    from sparse_train.upcycle.report import REPORT_FILE, conversion_report, format_report

    if args.num_experts < 1 or args.top_k < 1 or args.noise < 0 or not 0 <= args.drop_ratio <= 1:
        raise UsageError("sparse-train upcycle: --num-experts, --top-k >= 1, --noise >= 0, --drop-ratio in [0, 1]")
    if args.calib is not None and args.method not in CALIBRATED:
        raise UsageError(f"sparse-train upcycle: --calib is for {', '.join(CALIBRATED)}; {args.method} reads no data")
    check_target(Path(args.target), args.overwrite)
    source = load_source(Path(args.source))
    spec = UpcycleSpec(
        args.method,
        args.num_experts,
        args.top_k,
        layers=args.layers,
        seed=args.seed,
        noise=args.noise,
        drop_ratio=args.drop_ratio,
        partition=args.partition,
        granularity=args.granularity,
        num_shared=args.num_shared,
    )
    planned = upcycled_config(source.cfg, spec)  # checks the request before the work starts
    if args.format == "hf":
        hf.export_arch(planned)
    calib = None
    if args.method in CALIBRATED:
        if args.calib_tokens < 1:
            raise UsageError(f"sparse-train upcycle: --calib-tokens must be >= 1, got {args.calib_tokens}")
        tokens, where = calibration_tokens(
            source.tokenizer(), args.calib, args.calib_tokens, source.cfg.model.vocab_size, args.seed
        )
        print(f"calibrating on {tokens.size} tokens of {where}", file=sys.stderr)
        calib = ffn_inputs(source.cfg, source.state, tokens, planned.moe.layers, source=where)
    with tqdm(total=len(planned.moe.layers), desc=f"upcycle ({args.method})", unit="block", file=sys.stderr) as bar:
        cfg, state = upcycle(source.cfg, source.state, spec, progress=lambda i: bar.update(1), calib=calib)
    extra = {}
    if calib is not None:
        report = conversion_report(source.cfg, source.state, cfg, state, calib)
        print(
            f"relative error of each converted FFN on {report['calibration']['held_out_tokens']} held-out tokens:\n"
            + format_report(report),
            file=sys.stderr,
        )
        extra[REPORT_FILE] = json.dumps(report, indent=1) + "\n"
    what = write_model(
        Path(args.target),
        cfg,
        state,
        args.format,
        overwrite=args.overwrite,
        tokenizer_dir=source.tokenizer_dir,
        extra_files=extra,
    )
    if cfg.model.ffn == "fff":
        shape = f"depth-{cfg.fff.depth} trees of {cfg.fff.num_leaves} leaves of width {cfg.fff.leaf_width}"
    else:
        shared = f" + {cfg.moe.num_shared_experts} shared" if cfg.moe.num_shared_experts else ""
        shape = f"{cfg.moe.num_experts} experts{shared} of width {cfg.moe.expert_hidden}"
    k = cfg.fff.top_k if cfg.model.ffn == "fff" else cfg.router.top_k
    print(f"wrote {args.target}: {what}, {shape}, top-{k} in blocks {cfg.moe.layers}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from sparse_train.upcycle.io import load_source, write_model

    source = load_source(Path(args.source))
    what = write_model(
        Path(args.target),
        source.cfg,
        source.state,
        args.format,
        overwrite=args.overwrite,
        tokenizer_dir=source.tokenizer_dir,
    )
    print(f"wrote {args.target}: {what}")
    return 0


def cmd_ckpt(args: argparse.Namespace) -> int:
    from sparse_train.train import checkpoint as ckpt

    path = ckpt.resolve_checkpoint_path(args.path, warn=lambda msg: print(f"warning: {msg}", file=sys.stderr))
    if args.ckpt_command == "info":
        print(json.dumps(ckpt.describe(path), indent=1))
        return 0
    out = ckpt.consolidate(path, args.target, overwrite=args.overwrite)
    print(f"wrote {out}: the weights of {path} as one safetensors file")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from sparse_train.sweeps import fit as fitting
    from sparse_train.sweeps.spec import SweepError

    if args.sweep_command == "run":
        from sparse_train.launch.ray_launch import RayLaunchError
        from sparse_train.sweeps.runner import RESULTS, run_sweep
        from sparse_train.sweeps.spec import load_spec

        if (
            args.cpus_per_trial <= 0
            or args.gpus_per_trial < 0
            or (args.max_parallel is not None and args.max_parallel < 1)
        ):
            raise UsageError("sparse-train sweep run: --cpus-per-trial > 0, --gpus-per-trial >= 0, --max-parallel >= 1")
        spec = load_spec(args.spec)
        try:
            counts = run_sweep(
                spec,
                args.out,
                executor=args.executor,
                address=args.ray_address,
                max_parallel=args.max_parallel,
                cpus_per_trial=args.cpus_per_trial,
                gpus_per_trial=args.gpus_per_trial,
            )
        except RayLaunchError as err:
            raise UsageError(f"sparse-train sweep run: {err}") from None
        print(f"sweep {spec.name}: {counts['done']} done, {counts['failed']} failed; results in {args.out / RESULTS}")
        return 0 if counts["failed"] == 0 else 1
    if args.sweep_command == "fit" and args.by_family:
        result = fitting.fit_families(fitting.read_results(args.dir, args.metric), args.law, bootstrap=args.bootstrap)
        result["metric"] = args.metric
        out = args.out or args.dir / f"fit-{args.law}-families.json"
        out.write_text(json.dumps(result, indent=1) + "\n")
        for fam, rows in result["crossover"].items():
            for r in rows:
                where = (
                    f"crosses {result['base']} at {r['crossing_tokens']:.3g} tokens "
                    f"({r['crossing_tokens_per_param']:.1f}/param)"
                    if r["crossing_tokens"]
                    else "no crossing"
                )
                print(
                    f"{fam}, N_active {r['params_active']:.3g}: {where}; {fam} - {result['base']} = "
                    f"{r['gap_at_fewest_tokens']:+.4f} at {r['tokens'][0]:.3g} tokens, "
                    f"{r['gap_at_most_tokens']:+.4f} at {r['tokens'][1]:.3g}"
                )
        print(f"written to {out}")
        return 0
    if args.sweep_command == "fit":
        result = fitting.fit(fitting.read_results(args.dir, args.metric), args.law, bootstrap=args.bootstrap)
        result["metric"] = args.metric
        out = args.out or args.dir / f"fit-{args.law}.json"
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps({k: result[k] for k in ("law", "params", "ci95", "points", "rms_log_residual")}, indent=1))
        if result["at_bound"]:
            print(f"at a bound of the search (not identified by these points): {', '.join(result['at_bound'])}")
        held = result["holdout"]
        if "mean_abs_rel_error" in held:
            print(
                f"held out the {len(held['held_out'])} largest-compute runs: mean |relative error| of "
                f"their predicted loss {held['mean_abs_rel_error']:.4f} (fit on {held['fit_on']})"
            )
        print(f"written to {out}")
        return 0
    result = _load_fit(args.dir, args.law)
    if args.sweep_command == "optimal":
        import csv

        rows = [r for r in csv.DictReader((args.dir / "results.csv").open()) if r["status"] == "done"]
        observed_e = sorted({int(float(r["num_experts"])) for r in rows}) or [1]
        max_e = args.max_experts or max(observed_e)
        experts = sorted({e for e in [1, 2, 4, 8, 16, 32, 64, 128, *observed_e] if e <= max_e})
        grans = sorted({float(r["granularity"]) for r in rows}) or [1.0]
        best = fitting.optimal(result, args.flops, experts=experts, granularities=grans)
        print(json.dumps({"law": result["law"], **best}, indent=1))
        return 0
    from sparse_train.sweeps.plots import plot_sweep

    if not (args.dir / "results.csv").is_file():
        raise SweepError(f"{args.dir / 'results.csv'} does not exist (run the sweep first)")
    for path in plot_sweep(
        args.dir, result, metric=result.get("metric", "final_val_loss") if result else "final_val_loss"
    ):
        print(f"wrote {path}")
    return 0


def _load_fit(directory: Path, law: str | None) -> dict | None:
    from sparse_train.sweeps.spec import SweepError

    names = [law] if law else ["moe", "chinchilla"]
    for name in names:
        path = directory / f"fit-{name}.json"
        if path.is_file():
            return json.loads(path.read_text())
    if law:
        raise SweepError(f"no {law} fit in {directory}: run `sparse-train sweep fit {directory} --law {law}` first")
    return None


def cmd_plot_runs(args: argparse.Namespace) -> int:
    from sparse_train.train import plots

    runs = []
    for spec in args.runs:
        label, sep, rest = spec.partition("=")
        directory, _, offset = rest.partition("@")
        if not sep or not label or not directory:
            raise UsageError(f"sparse-train plot-runs: {spec!r} is not LABEL=RUN_DIR[@OFFSET]")
        if offset and not offset.isdigit():
            raise UsageError(f"sparse-train plot-runs: offset {offset!r} in {spec!r} is not a step count")
        metrics = Path(directory) / "metrics.jsonl"
        if not metrics.is_file():
            raise UsageError(f"sparse-train plot-runs: {metrics} does not exist (is {directory} a run directory?)")
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        runs.append((label, records, int(offset or 0)))
    fig = plots.compare_runs(runs)
    if args.title:
        fig.axes[0].set_title(args.title)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".png", ".svg"):
        fig.savefig(str(args.out) + suffix, dpi=110)
    plots.plt.close(fig)
    print(f"wrote {args.out}.png, {args.out}.svg")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import importlib.metadata
    import os

    import torch

    import sparse_train
    from sparse_train.runtime import MALLOC_ENV

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    print(
        json.dumps(
            {
                "sparse_train": sparse_train.__version__,
                "python": sys.version.split()[0],
                "torch": torch.__version__,
                "cuda_available": torch.cuda.is_available(),
                "cuda_devices": torch.cuda.device_count(),
                "threads": torch.get_num_threads(),
                "integrations": {name: version(name) for name in ("triton", "transformers", "deepspeed", "ray")},
                "malloc_tuning": {key: os.environ.get(key) for key in MALLOC_ENV},
                "triton_interpret": os.environ.get("TRITON_INTERPRET"),
            },
            indent=1,
        )
    )
    return 0


COMMANDS = {
    "launch": cmd_launch,
    "bench": cmd_bench,
    "info": cmd_info,
    "train": cmd_train,
    "eval": cmd_eval,
    "generate": cmd_generate,
    "config": cmd_config,
    "upcycle": cmd_upcycle,
    "convert": cmd_convert,
    "plot-runs": cmd_plot_runs,
    "ckpt": cmd_ckpt,
    "sweep": cmd_sweep,
}


def main(argv: Sequence[str] | None = None) -> int:
    from sparse_train.data.corpus import DataError
    from sparse_train.train.checkpoint import CheckpointError
    from sparse_train.train.trainer import TrainingStopped

    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return USER_ERROR
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return USER_ERROR
    except (DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return USER_ERROR
    except TrainingStopped as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The console script and `python -m sparse_train`: tune the process, then run `main`."""
    from sparse_train.runtime import exec_with_tuned_allocator

    exec_with_tuned_allocator(sys.argv[1:])
    sys.exit(main())


if __name__ == "__main__":
    entry()
