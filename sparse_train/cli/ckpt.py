"""`sparse-train ckpt info | verify | convert`: inspect or check a checkpoint, or consolidate it into one
safetensors file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sparse_train.cli.common import ArgumentParser


def register(subparsers: argparse._SubParsersAction) -> None:
    ck = subparsers.add_parser("ckpt", help="inspect or convert checkpoints")
    ck.set_defaults(run=run)
    ck_sub = ck.add_subparsers(dest="ckpt_command", required=True, parser_class=ArgumentParser)
    info = ck_sub.add_parser("info", help="a checkpoint's format, step, layout and tensors, as JSON")
    info.add_argument("path", type=Path, help="a checkpoint directory, or a run directory (its newest)")
    verify = ck_sub.add_parser(
        "verify", help="check every file of a checkpoint (or of each checkpoint of a run) against its manifest"
    )
    verify.add_argument("path", type=Path, help="a checkpoint directory, or a run directory (all its checkpoints)")
    conv = ck_sub.add_parser("convert", help="a checkpoint's whole weights (any layout) as one safetensors file")
    conv.add_argument("path", type=Path, help="a checkpoint directory, or a run directory (its newest)")
    conv.add_argument("--to", dest="target", type=Path, required=True, help="output file, e.g. model.safetensors")
    conv.add_argument("--overwrite", action="store_true", help="replace --to if it exists")


def run(args: argparse.Namespace) -> int:
    from sparse_train.train import checkpoint as ckpt

    if args.ckpt_command == "verify":  # a full check: sizes and the checksum of every file
        reports = [ckpt.verify_report(path) for path in ckpt.checkpoints_in(args.path)]
        print(json.dumps(reports, indent=1))
        return 0 if all(r["ok"] for r in reports) else 1
    path = ckpt.resolve_checkpoint_path(args.path, warn=lambda msg: print(f"warning: {msg}", file=sys.stderr))
    if args.ckpt_command == "info":
        print(json.dumps(ckpt.describe(path), indent=1))
        return 0
    out = ckpt.consolidate(path, args.target, overwrite=args.overwrite)
    print(f"wrote {out}: the weights of {path} as one safetensors file")
    return 0
