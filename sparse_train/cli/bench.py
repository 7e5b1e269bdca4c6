"""`sparse-train bench ...`: benchmarks that print JSON, one object per measured case.

Each benchmark's work lives in sparse_train/bench/; this module checks the arguments and calls it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from sparse_train.bench.hf_models import KINDS as HF_KINDS  # no torch: --help stays light
from sparse_train.cli.common import ArgumentParser, add_config_args, add_json_flag, add_overrides
from sparse_train.errors import UsageError

if TYPE_CHECKING:  # --help and argument errors import no torch
    import torch

MOE_SHAPES = ["mixtral-like", "fine-grained", "skewed"]


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks that print JSON (one object per measured case)")
    bench.set_defaults(run=run)
    bench_sub = bench.add_subparsers(dest="bench", required=True, parser_class=ArgumentParser)

    moe = bench_sub.add_parser("moe-layer", help="MoE layer vs the dense limit, HF Mixtral and DeepSpeed-MoE")
    add_json_flag(moe)
    moe.add_argument("--shapes", nargs="+", default=MOE_SHAPES, choices=MOE_SHAPES)
    moe.add_argument("--tokens", type=int, help="override the token count of every shape (quick runs)")
    moe.add_argument("--repeats", type=int, default=5)
    moe.add_argument("--warmup", type=int, default=2)
    moe.add_argument("--seed", type=int, default=0)
    moe.add_argument("--peers", default="hf,deepspeed", help="comma list of hf, deepspeed; empty for none")
    moe.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto = cuda when available, else cpu"
    )
    moe.add_argument(
        "--backends",
        default="auto",
        help="comma list of kernel backends for our layer (auto, triton, torch, grouped_mm, reference); the first "
        "is ours_ms, each also gets ours_<backend>_ms (null with an error where it cannot run)",
    )
    moe.add_argument(
        "--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: every candidate under bf16 autocast"
    )

    disp = bench_sub.add_parser("dispatch", help="expert-parallel all-to-all of the tiny model on gloo: bytes, time")
    add_json_flag(disp)
    disp.add_argument("--ep", type=int, nargs="+", default=[2, 4], help="expert-parallel sizes (one process each)")
    disp.add_argument("--steps", type=int, default=12, help="optimizer steps per case, warm-up included")
    disp.add_argument("--warmup", type=int, default=2)
    disp.add_argument("--compare-no-dedup", action="store_true", help="also run each EP size without deduplication")
    disp.add_argument("--config", help="model recipe (default: configs/tiny-moe.yaml of this checkout)")
    disp.add_argument(
        "--balanced-routing", action="store_true",
        help="split sizes of perfectly balanced routing (the planner's and the dry run's assumption)",
    )  # fmt: skip
    add_overrides(disp, "override config fields in every case, e.g. --set router.num_groups=4 (repeatable)")

    infer = bench_sub.add_parser("fff-infer", help="hard FFF inference vs a dense FFN of the same width")
    add_json_flag(infer)
    infer.add_argument("--depths", type=int, nargs="+", default=[4, 6, 8, 10])
    infer.add_argument("--batches", type=int, nargs="+", default=[1, 64, 4096])
    infer.add_argument("--repeats", type=int, default=7)
    infer.add_argument("--warmup", type=int, default=2)
    infer.add_argument("--seed", type=int, default=0)
    infer.add_argument("--peers", default="fastfeedforward", help="fastfeedforward, or empty for none")

    mem = bench_sub.add_parser(
        "memory", help="each rank's memory for a config and layout: measured (build, step) and predicted"
    )
    add_json_flag(mem)
    add_config_args(mem)
    mem.add_argument("--nproc", type=int, required=True, help="local processes (ranks), as launch --nproc")
    mem.add_argument("--steps", type=int, default=2, help="training steps measured (the second holds AdamW state)")
    mem.add_argument("--timeout", type=float, default=1800, help="seconds a rank may take before the run fails")

    plan = bench_sub.add_parser(
        "plan", help="the planner's predictions beside each layout's dry run (memory, FLOPs, collectives) or real run"
    )
    add_json_flag(plan)
    plan.add_argument("--gpu", default="h100", help="GPU kind of the predictions (default h100)")
    real = plan.add_mutually_exclusive_group()
    real.add_argument(
        "--gloo", action="store_true",
        help="beside real runs on local gloo processes instead (peak memory per rank, as bench memory)",
    )  # fmt: skip
    real.add_argument(
        "--collectives", action="store_true",
        help="beside real runs on local gloo processes with balanced routing: each rank's bytes of every "
        "collective kind in a step",
    )  # fmt: skip

    repro = bench_sub.add_parser("fff-repro", help="FFF vs FFF + load balancing (+ master leaf) on sklearn digits")
    add_json_flag(repro)
    repro.add_argument("--depths", type=int, nargs="+", default=[3, 5])
    repro.add_argument("--seeds", type=int, default=5, help="runs per (depth, variant), seeds 0..N-1")
    repro.add_argument("--epochs", type=int, default=150)

    convert = bench_sub.add_parser(
        "convert", help="HF import/export of each architecture vs transformers: logit errors, exact round trip"
    )
    add_json_flag(convert)
    convert.add_argument("--archs", nargs="+", default=list(HF_KINDS), choices=HF_KINDS, help="default: all")
    convert.add_argument("--seed", type=int, default=0, help="seed of the random weights and tokens")

    kernels = bench_sub.add_parser(
        "kernels", help="every Triton kernel compiled ahead of time for GPU targets (no GPU needed): resources"
    )
    add_json_flag(kernels)
    kernels.add_argument("--aot", action="store_true", help="compile for the targets (the only mode without a GPU)")
    kernels.add_argument("--targets", default="all", help="comma list of sm_80, sm_90, sm_100, sm_121, gfx942; or all")
    kernels.add_argument("--dtypes", default="all", help="comma list of fp32, bf16, fp16; or all")
    kernels.add_argument(
        "--quick", action="store_true", help="each kernel once per target: bf16, its largest configuration"
    )
    kernels.add_argument("--jobs", type=int, help="compiler processes (default: one per core)")


def run(args: argparse.Namespace) -> int:
    commands = {"moe-layer": _moe_layer, "dispatch": _dispatch, "fff-infer": _fff_infer, "fff-repro": _fff_repro}
    commands["memory"] = _memory
    commands["convert"] = _convert
    commands["plan"] = _plan
    if args.bench == "kernels":
        return _kernels(args)
    commands[args.bench](args)
    return 0


def _peers(text: str, allowed: set[str], command: str) -> set[str]:
    peers = {p for p in text.split(",") if p}
    if peers - allowed:
        allowed_list = ", ".join(sorted(allowed))
        raise UsageError(
            f"sparse-train bench {command}: unknown --peers {sorted(peers - allowed)}; allowed: {allowed_list}"
        )
    return peers


def _moe_layer(args: argparse.Namespace) -> None:
    from sparse_train.bench import moe_layer

    peers = _peers(args.peers, {"hf", "deepspeed"}, "moe-layer")
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
        device=_moe_device(args.device),
        backends=_moe_backends(args.backends),
        precision=args.precision,
    )


def _moe_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    elif name == "cuda" and not torch.cuda.is_available():
        build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
        raise UsageError(f"sparse-train bench moe-layer: --device cuda, but torch ({build}) sees no CUDA device")
    return torch.device(name)


def _moe_backends(text: str) -> tuple[str, ...]:
    from sparse_train.kernels import BACKENDS

    backends = tuple(dict.fromkeys(b for b in text.split(",") if b))  # in order, once each
    unknown = [b for b in backends if b not in BACKENDS]
    if not backends or unknown:
        raise UsageError(
            f"sparse-train bench moe-layer: --backends needs one or more of {', '.join(BACKENDS)}; got {text!r}"
        )
    return backends


def _dispatch(args: argparse.Namespace) -> None:
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
        overrides=args.overrides,
        balanced_routing=args.balanced_routing,
    )


def _fff_infer(args: argparse.Namespace) -> None:
    from sparse_train.bench import fff_infer

    peers = _peers(args.peers, {"fastfeedforward"}, "fff-infer")
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


def _fff_repro(args: argparse.Namespace) -> None:
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


def _memory(args: argparse.Namespace) -> None:
    from sparse_train.bench import memory

    if args.nproc < 1 or args.steps < 1 or args.timeout <= 0:
        raise UsageError("sparse-train bench memory: --nproc >= 1, --steps >= 1 and --timeout > 0 required")
    memory.run(args.config, args.overrides, args.nproc, steps=args.steps, timeout=args.timeout, as_json=args.json)


def _plan(args: argparse.Namespace) -> None:
    import json
    import sys

    from sparse_train.cli.common import on_fake_cuda
    from sparse_train.plan.hardware import gpu_spec
    from sparse_train.plan.validate import validation_table

    gpu = gpu_spec(args.gpu)
    on_fake_cuda(args.argv, 8, "sparse-train bench plan")  # the probes and dry runs run on fake CUDA

    def gloo_line(row: dict) -> None:
        print(json.dumps(row), flush=True)
        if not args.json:
            print(
                f"{row['model']:<14} {row['layout']:<44} predicted {row['predicted_peak_mb']:7.1f} MB  "
                f"measured {row['measured_peak_mb']:7.1f} MB  {row['memory_error']:+6.1%}",
                file=sys.stderr,
            )

    def line(row: dict) -> None:
        print(json.dumps(row), flush=True)
        if not args.json:
            measured = row["measured_collective_bytes"]
            exact = row["predicted_collective_bytes"] == measured if measured else "n/a"
            print(
                f"{row['model']:<17} {row['layout']:<44} memory {row['memory_error']:+6.1%}  "
                f"FLOPs exact {row['predicted_flops'] == row['measured_flops']}  collectives exact {exact}",
                file=sys.stderr,
            )

    def collectives_line(row: dict) -> None:
        print(json.dumps(row), flush=True)
        if not args.json:
            kinds = ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in row["predicted_collective_bytes"].items())
            print(f"{row['model']:<17} {row['layout']:<44} {kinds}  exact {row['exact']}", file=sys.stderr)

    if args.gloo:
        from sparse_train.plan.measured import gloo_table

        gloo_table(gpu, log=gloo_line)
    elif args.collectives:
        from sparse_train.plan.measured import collectives_table

        collectives_table(gpu, log=collectives_line)
    else:
        validation_table(gpu, log=line)


def _convert(args: argparse.Namespace) -> None:
    from sparse_train.bench import convert
    from sparse_train.bench.hf_models import import_transformers

    try:
        import_transformers()
    except RuntimeError as err:
        raise UsageError(f"sparse-train bench convert: {err}") from None
    convert.run(list(dict.fromkeys(args.archs)), seed=args.seed, as_json=args.json)


def _kernels(args: argparse.Namespace) -> int:
    """0 when every configuration compiles and fits its target's shared memory, 1 otherwise."""
    from sparse_train.bench import kernels
    from sparse_train.kernels import aot, triton_available

    if not args.aot:
        raise UsageError("sparse-train bench kernels: pass --aot (compiling for GPU targets is the only mode for now)")
    targets = _choices(args.targets, [t.name for t in aot.TARGETS], "--targets")
    dtypes = _choices(args.dtypes, list(aot.DTYPES), "--dtypes")
    if args.jobs is not None and args.jobs < 1:
        raise UsageError("sparse-train bench kernels: --jobs >= 1 required")
    if not triton_available():
        raise UsageError("sparse-train bench kernels: needs triton: pip install 'sparse_train[triton]'")
    rows = kernels.run(targets, dtypes, quick=args.quick, jobs=args.jobs, as_json=args.json)
    # Spills cost speed and are reported; a kernel that does not compile or fit cannot run.
    return 1 if any(aot.cannot_run(row) for row in rows) else 0


def _choices(text: str, allowed: list[str], flag: str) -> list[str]:
    chosen = allowed if text == "all" else list(dict.fromkeys(c for c in text.split(",") if c))
    if not chosen or set(chosen) - set(allowed):
        raise UsageError(
            f"sparse-train bench kernels: {flag} takes all or a comma list of {', '.join(allowed)}; got {text!r}"
        )
    return chosen
