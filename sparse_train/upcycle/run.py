"""`sparse-train upcycle`: read a dense model, convert it, report the conversion, write the result."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm import tqdm

from sparse_train.config import Config, ConfigError
from sparse_train.lazy import read_all
from sparse_train.upcycle import hf
from sparse_train.upcycle.calibration import calibration_tokens, ffn_inputs
from sparse_train.upcycle.io import check_target, load_source, write_model
from sparse_train.upcycle.methods import CALIBRATED, UpcycleSpec, upcycle, upcycled_config
from sparse_train.upcycle.report import REPORT_FILE, conversion_report, format_report


def run_upcycle(
    source_path: Path,
    target: Path,
    spec: UpcycleSpec,
    *,
    output_format: str = "native",
    overwrite: bool = False,
    calib_path: Path | None = None,
    calib_tokens: int = 8192,
) -> str:
    """Convert `source_path` into `target`; returns a one-line description of what was written.
    Progress and the conversion report go to stderr."""
    if calib_path is not None and spec.method not in CALIBRATED:
        raise ConfigError("--calib", f"is for {', '.join(CALIBRATED)}; {spec.method} reads no data")
    if calib_tokens < 1:
        raise ConfigError("--calib-tokens", f"must be >= 1, got {calib_tokens}")
    check_target(target, overwrite)
    source = load_source(source_path)
    dense = source.weights.tensors  # by reference: read one block at a time as the conversion goes
    planned = upcycled_config(source.cfg, spec)  # checks the request before the work starts
    if output_format == "hf":
        hf.export_arch(planned)
    calib = None
    if spec.method in CALIBRATED:
        tokens, where = calibration_tokens(
            source.tokenizer(), calib_path, calib_tokens, source.cfg.model.vocab_size, spec.seed
        )
        print(f"calibrating on {tokens.size} tokens of {where}", file=sys.stderr)
        # the dense model runs whole over the calibration text (and is freed after)
        calib = ffn_inputs(source.cfg, read_all(dense), tokens, planned.model.sparse_layers, source=where)
    # converted as written (and once more for the report of a calibrated conversion)
    passes = 2 if calib is not None else 1
    bar = tqdm(
        total=passes * len(planned.model.sparse_layers), desc=f"upcycle ({spec.method})", unit="block", file=sys.stderr
    )
    cfg, state = upcycle(source.cfg, dense, spec, progress=lambda i: bar.update(1), calib=calib)
    extra = {}
    if calib is not None:
        report = conversion_report(source.cfg, dense, cfg, state, calib)
        held_out = report["calibration"]["held_out_tokens"]
        print(
            f"relative error of each converted FFN on {held_out} held-out tokens:\n" + format_report(report),
            file=sys.stderr,
        )
        extra[REPORT_FILE] = json.dumps(report, indent=1) + "\n"
    try:
        tokenizer_dir = source.tokenizer_dir
        what = write_model(
            target, cfg, state, output_format, overwrite=overwrite, tokenizer_dir=tokenizer_dir, extra_files=extra
        )
    finally:
        bar.close()
    return f"{what}, {describe_sparse_layers(cfg)}"


def describe_sparse_layers(cfg: Config) -> str:
    if cfg.model.ffn == "fff":
        shape = f"depth-{cfg.fff.depth} trees of {cfg.fff.num_leaves} leaves of width {cfg.fff.leaf_width}"
        k = cfg.fff.top_k
    else:
        shared = f" + {cfg.moe.num_shared_experts} shared" if cfg.moe.num_shared_experts else ""
        shape = f"{cfg.moe.num_experts} experts{shared} of width {cfg.moe.expert_hidden}"
        k = cfg.router.top_k
    return f"{shape}, top-{k} in blocks {cfg.model.sparse_layers}"
