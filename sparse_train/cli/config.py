"""`sparse-train config`: the resolved config as YAML, or every field with its default and help.

Imports no torch: answering it must be instant."""

from __future__ import annotations

import argparse

from sparse_train.cli.common import add_config_args


def register(subparsers: argparse._SubParsersAction) -> None:
    cfg = subparsers.add_parser("config", help="print the resolved config (YAML), or every field with its help")
    cfg.set_defaults(run=run)
    add_config_args(cfg)
    cfg.add_argument("--fields", action="store_true", help="list every field, its default and meaning")


def run(args: argparse.Namespace) -> int:
    from sparse_train.config import Config, load_config
    from sparse_train.configtypes import field_help

    if args.fields:
        for name, help_text, default in field_help(Config):
            print(f"{name} = {default!r}\n    {help_text}")
        return 0
    print(load_config(args.config, args.overrides).to_yaml(), end="")
    return 0
