"""`sparse-train upcycle` (dense -> MoE / FFF) and `sparse-train convert` (HF <-> native, unchanged model)."""

from __future__ import annotations

import argparse
from pathlib import Path

from sparse_train.errors import UsageError

METHODS = ("copy", "split", "moefication", "cmoe", "fff")


def register(subparsers: argparse._SubParsersAction) -> None:
    up = subparsers.add_parser(
        "upcycle", help="turn a dense checkpoint (HF directory or sparse_train run) into an MoE or FFF"
    )
    up.set_defaults(run=run)
    up.add_argument("--from", dest="source", required=True, help="HF model directory or sparse_train checkpoint/run")
    up.add_argument("--to", dest="target", required=True, help="output directory (must not exist; see --overwrite)")
    up.add_argument(
        "--method",
        required=True,
        choices=METHODS,
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
    up.add_argument(
        "--num-shared",
        type=int,
        default=None,
        help="shared experts beside the routed ones: copy (default 0) the dense FFN cut into this many, "
        "shared and routed parts each half-weighted (DeepSeek-V3's layout); cmoe (default 1) the highest-rate neurons",
    )
    up.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of the upcycled config, e.g. router.score=sigmoid (repeatable)",
    )
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

    conv = subparsers.add_parser("convert", help="HF directory <-> sparse_train checkpoint, without changing the model")
    conv.set_defaults(run=run_convert)
    conv.add_argument("--from", dest="source", required=True, help="HF model directory or sparse_train checkpoint/run")
    conv.add_argument("--to", dest="target", required=True, help="output directory (must not exist; see --overwrite)")
    conv.add_argument("--format", required=True, choices=["native", "hf"], help="what to write")
    conv.add_argument("--overwrite", action="store_true", help="replace --to if it exists")


def run(args: argparse.Namespace) -> int:
    from sparse_train.upcycle.methods import UpcycleSpec
    from sparse_train.upcycle.run import run_upcycle as upcycle

    if args.num_experts < 1 or args.top_k < 1 or args.noise < 0 or not 0 <= args.drop_ratio <= 1:
        raise UsageError("sparse-train upcycle: --num-experts, --top-k >= 1, --noise >= 0, --drop-ratio in [0, 1]")
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
        overrides=tuple(args.overrides),
    )
    what = upcycle(
        Path(args.source),
        Path(args.target),
        spec,
        output_format=args.format,
        overwrite=args.overwrite,
        calib_path=args.calib,
        calib_tokens=args.calib_tokens,
    )
    print(f"wrote {args.target}: {what}")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from sparse_train.upcycle.io import load_source, write_model

    source = load_source(Path(args.source))
    what = write_model(
        Path(args.target),
        source.cfg,
        source.weights.tensors,  # read as written: one block at a time into HF files
        args.format,
        overwrite=args.overwrite,
        tokenizer_dir=source.tokenizer_dir,
    )
    print(f"wrote {args.target}: {what}")
    return 0
