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


def on_fake_cuda(argv: list[str], devices: int, command: str) -> None:
    """Return at once when the fake CUDA device (dryrun.fake_cuda) is loaded in this process;
    else run this command again with it preloaded (it must be in place before torch starts):
    this process is replaced and never returns. One line when the device cannot be built."""
    import os
    import sys

    from sparse_train.dryrun import fake_cuda

    if fake_cuda.is_loaded():
        return
    try:
        env = fake_cuda.preload_environment(devices)
    except fake_cuda.FakeCudaUnavailable as err:
        raise UsageError(f"{command}: {err}") from None
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "sparse_train", *argv], env)
