"""`sparse-train train`: train a model from a recipe (or from another model's weights)."""

from __future__ import annotations

import argparse
from pathlib import Path

from sparse_train.cli.common import add_config_args


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="train a model from a config")
    train.set_defaults(run=run)
    add_config_args(train)
    train.add_argument("--run-dir", help="output directory (default runs/CONFIG_NAME/TIMESTAMP)")
    train.add_argument("--resume", help="'auto' (newest complete checkpoint in the run dir) or a checkpoint path")
    train.add_argument(
        "--init-from",
        help="start from these weights (HF directory, upcycled or trained sparse_train run); the model, moe, "
        "router and fff sections come from it, the rest from --config, then --set",
    )


def request_from_args(args: argparse.Namespace):
    from sparse_train.launch.train_entry import TrainRequest

    return TrainRequest(
        config=args.config,
        overrides=list(args.overrides),
        run_dir=Path(args.run_dir) if args.run_dir else None,
        resume=args.resume,
        init_from=args.init_from,
    )


def run(args: argparse.Namespace) -> int:
    from sparse_train.launch.train_entry import run_training
    from sparse_train.train.summary import format_summary

    summary = run_training(request_from_args(args))
    if summary is not None:
        print(format_summary(summary))
    return 0
