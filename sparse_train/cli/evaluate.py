"""`sparse-train eval`: a checkpoint's validation loss, as JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sparse_train.cli.common import add_overrides


def register(subparsers: argparse._SubParsersAction) -> None:
    ev = subparsers.add_parser("eval", help="validation loss of a checkpoint, as JSON")
    ev.set_defaults(run=run)
    ev.add_argument("--checkpoint", required=True, help="checkpoint directory or run directory")
    add_overrides(ev, "override fields of the checkpoint's config, e.g. data.path or train.eval_batches")


def run(args: argparse.Namespace) -> int:
    from sparse_train.inference import evaluate, load_trained

    print(json.dumps(evaluate(load_trained(Path(args.checkpoint), args.overrides))))
    return 0
