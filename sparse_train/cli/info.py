"""`sparse-train info`: versions, devices, optional integrations and runtime settings, as JSON."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    info = subparsers.add_parser("info", help="versions, devices, optional integrations and runtime settings, as JSON")
    info.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from sparse_train.runtime import environment_info

    print(json.dumps(environment_info(), indent=1))
    return 0
