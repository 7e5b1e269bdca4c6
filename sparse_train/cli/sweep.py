"""`sparse-train sweep run | fit | optimal | plot | table`: scaling-law and variant sweeps (sparse_train/sweeps/)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sparse_train.cli.common import ArgumentParser
from sparse_train.errors import LaunchError, UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    sw = subparsers.add_parser("sweep", help="scaling-law sweeps: run a grid of trainings, fit laws, plot the frontier")
    sw.set_defaults(run=run)
    sw_sub = sw.add_subparsers(dest="sweep_command", required=True, parser_class=ArgumentParser)

    sw_run = sw_sub.add_parser("run", help="run (or finish) every trial of a sweep spec")
    sw_run.add_argument("spec", type=Path, help="sweep YAML, e.g. configs/sweeps/moe-vs-dense.yaml")
    sw_run.add_argument("--out", type=Path, required=True, help="results directory (reruns skip finished trials)")
    sw_run.add_argument("--ray-address", default=None, help="auto or HOST:PORT; default: a local Ray instance")
    sw_run.add_argument("--executor", default="ray", choices=["ray", "local"], help="local: subprocesses, no Ray")
    sw_run.add_argument("--max-parallel", type=int, default=None, help="trials at once (default: CPUs / per-trial)")
    sw_run.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs (and torch threads) per trial")
    sw_run.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs Ray assigns each trial (ray executor)")

    sw_fit = sw_sub.add_parser("fit", help="fit a scaling law to a sweep's results (JSON)")
    sw_fit.add_argument("dir", type=Path, help="the sweep's --out directory")
    sw_fit.add_argument("--law", default="chinchilla", choices=["chinchilla", "moe"])
    sw_fit.add_argument("--out", type=Path, default=None, help="where to write the fit (default DIR/fit-LAW.json)")
    sw_fit.add_argument("--bootstrap", type=int, default=100, help="resamples for the 95%% intervals")
    sw_fit.add_argument("--metric", default="final_val_loss", choices=["final_val_loss", "final_train_loss"])
    sw_fit.add_argument(
        "--by-family",
        action="store_true",
        help="fit each model family (dense, each E and G) on its own and report where each "
        "crosses dense at equal active parameters (DIR/fit-LAW-families.json)",
    )

    sw_opt = sw_sub.add_parser("optimal", help="compute-optimal N, D (and E, G) for a FLOP budget, from a fit")
    sw_opt.add_argument("dir", type=Path, help="the sweep's --out directory (with a fit)")
    sw_opt.add_argument("--flops", type=float, required=True, help="training budget, e.g. 1e21")
    sw_opt.add_argument("--law", default=None, choices=["chinchilla", "moe"], help="which fit (default: moe if fitted)")
    sw_opt.add_argument(
        "--max-experts", type=int, default=None, help="moe: largest E considered (default: the sweep's)"
    )

    sw_table = sw_sub.add_parser(
        "table", help="per variant: mean ± std over seeds of losses, expert load, specialisation, tokens/s"
    )
    sw_table.add_argument("dir", type=Path, help="the sweep's --out directory")
    sw_table.add_argument("--json", action="store_true", help="mean, std, min, max and every seed's value, as JSON")
    sw_table.add_argument(
        "--compare",
        nargs=2,
        metavar=("A", "B"),
        default=None,
        help="two variants side by side: B - A per metric, per seed (equal seeds paired) and over the larger std",
    )

    sw_plot = sw_sub.add_parser(
        "plot", help="PNG and SVG figures of a sweep (DIR/plots); a sweep with a variant axis: variants.png"
    )
    sw_plot.add_argument("dir", type=Path, help="the sweep's --out directory")
    sw_plot.add_argument(
        "--law", default=None, choices=["chinchilla", "moe"], help="the fit drawn (default: moe if fitted)"
    )


def run(args: argparse.Namespace) -> int:
    return {"run": _run, "fit": _fit, "optimal": _optimal, "plot": _plot, "table": _table}[args.sweep_command](args)


def _run(args: argparse.Namespace) -> int:
    from sparse_train.sweeps.runner import RESULTS, run_sweep
    from sparse_train.sweeps.spec import load_spec

    if args.cpus_per_trial <= 0 or args.gpus_per_trial < 0 or (args.max_parallel is not None and args.max_parallel < 1):
        raise UsageError("sparse-train sweep run: --cpus-per-trial > 0, --gpus-per-trial >= 0, --max-parallel >= 1")
    spec = load_spec(args.spec)
    try:
        counts = run_sweep(
            spec,
            args.out,
            executor=args.executor,
            address=args.ray_address,
            max_parallel=args.max_parallel,
            cpus_per_trial=args.cpus_per_trial,
            gpus_per_trial=args.gpus_per_trial,
        )
    except LaunchError as err:
        raise UsageError(f"sparse-train sweep run: {err}") from None
    print(f"sweep {spec.name}: {counts['done']} done, {counts['failed']} failed; results in {args.out / RESULTS}")
    return 0 if counts["failed"] == 0 else 1


def _fit(args: argparse.Namespace) -> int:
    from sparse_train.sweeps.analysis import describe_families, describe_fit, fit_sweep

    result, out = fit_sweep(
        args.dir, args.law, metric=args.metric, bootstrap=args.bootstrap, by_family=args.by_family, out=args.out
    )
    print(describe_families(result) if args.by_family else describe_fit(result))
    print(f"written to {out}")
    return 0


def _optimal(args: argparse.Namespace) -> int:
    from sparse_train.sweeps.analysis import load_fit, optimal_for_sweep

    result = load_fit(args.dir, args.law)
    if result is None:
        raise UsageError(f"sparse-train sweep optimal: no fit in {args.dir}: run `sparse-train sweep fit` first")
    print(json.dumps(optimal_for_sweep(args.dir, result, args.flops, args.max_experts), indent=1))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from sparse_train.sweeps.analysis import load_fit
    from sparse_train.sweeps.plots import plot_sweep, plot_variants
    from sparse_train.sweeps.runner import RESULTS
    from sparse_train.sweeps.spec import SweepError

    if not (args.dir / RESULTS).is_file():
        raise SweepError(f"{args.dir / RESULTS} does not exist (run the sweep first)")
    if _has_variants(args.dir / RESULTS):
        for path in plot_variants(args.dir):
            print(f"wrote {path}")
        return 0
    result = load_fit(args.dir, args.law)
    for path in plot_sweep(args.dir, result, metric=(result or {}).get("metric", "final_val_loss")):
        print(f"wrote {path}")
    return 0


def _has_variants(results: Path) -> bool:
    """Whether a sweep's results.csv comes from a spec with a `variant` axis."""
    with results.open() as fh:
        return "axis:variant" in (fh.readline().strip().split(","))


def _table(args: argparse.Namespace) -> int:
    from sparse_train.sweeps.variants import (
        compare,
        format_comparison,
        format_table,
        read_trials,
        summarise,
        table_json,
    )

    rows = summarise(read_trials(args.dir))
    if args.compare:
        result = compare(rows, *args.compare)
        print(json.dumps(result, indent=1) if args.json else format_comparison(result, *args.compare))
        return 0
    print(json.dumps(table_json(rows), indent=1) if args.json else format_table(rows))
    return 0
