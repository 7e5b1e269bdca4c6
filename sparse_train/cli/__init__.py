"""`sparse-train` (and `python -m sparse_train`): one module per command, each with
`register(subparsers)` (its arguments) and `run(args)` (parse, call the subsystem, print).

Errors the user can fix (config, data, checkpoints, arguments) end the process with exit status
2 and one line on stderr naming the problem; never a traceback. Nothing here imports torch at
module level: `--help`, `config` and config errors answer at once.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from sparse_train.cli import (
    bench,
    ckpt,
    config,
    dryrun,
    evaluate,
    generate,
    info,
    launch,
    plan,
    plot_runs,
    sweep,
    train,
    upcycle,
)
from sparse_train.cli.common import ArgumentParser
from sparse_train.errors import (
    TRAINING_STOPPED,
    USER_ERROR,
    CheckpointError,
    ConfigError,
    DataError,
    LaunchError,
    TrainingStopped,
    UsageError,
)

COMMANDS = (train, launch, evaluate, generate, bench, upcycle, ckpt, sweep, plot_runs, info, config, dryrun, plan)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="sparse-train", description="Train sparse (MoE / FFF) language models.")
    # `launch` checks the command it runs with this same parser, handed over here (no import back).
    parser.set_defaults(parse_command=lambda argv: build_parser().parse_args(argv))
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    warnings.formatwarning = _one_line_warning  # a user reads "warning: ...", not our source line
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # for a command that runs itself again
        return args.run(args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return USER_ERROR
    except (UsageError, DataError, CheckpointError, LaunchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return USER_ERROR
    except TrainingStopped as err:
        print(f"error: {err}", file=sys.stderr)
        return TRAINING_STOPPED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The console script and `python -m sparse_train`: tune the process, then run `main`."""
    from sparse_train.runtime import exec_with_tuned_allocator

    exec_with_tuned_allocator(sys.argv[1:])
    sys.exit(main())
