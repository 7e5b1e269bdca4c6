"""`sparse-train plot-runs`: loss curves of several runs in one figure (PNG and SVG)."""

from __future__ import annotations

import argparse
from pathlib import Path

from sparse_train.errors import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    plot = subparsers.add_parser("plot-runs", help="loss curves of several runs in one figure (PNG and SVG)")
    plot.set_defaults(run=run)
    plot.add_argument(
        "runs",
        nargs="+",
        metavar="LABEL=RUN_DIR[@OFFSET]",
        help="a run's label and directory; @OFFSET shifts its steps (a continued run)",
    )
    plot.add_argument("--out", required=True, type=Path, help="output path without suffix: writes OUT.png, OUT.svg")
    plot.add_argument("--title", default=None)


def parse_run(spec: str) -> tuple[str, Path, int]:
    """LABEL=RUN_DIR[@OFFSET] -> (label, run directory, step offset)."""
    label, sep, rest = spec.partition("=")
    directory, _, offset = rest.partition("@")
    if not sep or not label or not directory:
        raise UsageError(f"sparse-train plot-runs: {spec!r} is not LABEL=RUN_DIR[@OFFSET]")
    if offset and not offset.isdigit():
        raise UsageError(f"sparse-train plot-runs: offset {offset!r} in {spec!r} is not a step count")
    metrics = Path(directory) / "metrics.jsonl"
    if not metrics.is_file():
        raise UsageError(f"sparse-train plot-runs: {metrics} does not exist (is {directory} a run directory?)")
    return label, Path(directory), int(offset or 0)


def run(args: argparse.Namespace) -> int:
    from sparse_train.train.metrics import read_metrics
    from sparse_train.train.plots import plot_runs

    runs = [(label, read_metrics(directory), offset) for label, directory, offset in map(parse_run, args.runs)]
    paths = plot_runs(runs, args.out, args.title)
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0
