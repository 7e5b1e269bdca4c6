"""What every command module shares: the argument parser that fails in one line, the config flags."""

from __future__ import annotations

import argparse

from sparse_train.errors import UsageError


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises UsageError (one line, exit 2) instead of printing usage and exiting."""

    def error(self, message: str) -> None:
        raise UsageError(f"{self.prog}: {message}")


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML recipe (e.g. configs/tiny-moe.yaml); omitted = built-in defaults")
    add_overrides(parser, "override any config field, e.g. --set train.steps=100 (repeatable)")


def add_overrides(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help_text)


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="only the JSON lines on stdout (no table on stderr)")
