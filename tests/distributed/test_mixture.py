"""A data mixture in a parallel layout: the same batches, so the same per-source validation
losses and per-source routing as one process (the mixing is a function of seed and step)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sparse_train.launch.local import run_ranks
from tests.train.test_sources import mixture_config

LAYOUT = [
    "model.d_model=32",
    "moe.kernel_backend=torch",
    "router.balance_scope=global_batch",
    "train.grad_accum=2",
    "optimizer.eps=1e-6",
]
LAYOUTS = {"ep2-dp_shard2": ["parallel.ep=2"], "pp2": ["parallel.pp=2"]}


def _eval_records(cfg, run_dir: str) -> list[dict] | None:
    """The evaluation records of a short run (rank 0's metrics.jsonl)."""
    from sparse_train.train.trainer import Trainer

    trainer = Trainer(cfg, Path(run_dir), log=lambda msg: None)
    trainer.fit()
    if not trainer.is_main:
        return None
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "val_loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_per_source_validation_matches_one_process(layout, tmp_path):
    single = _eval_records(mixture_config(tmp_path / "data", *LAYOUT), str(tmp_path / "single"))
    cfg = mixture_config(tmp_path / "data2", *LAYOUT, *LAYOUTS[layout])
    parallel = run_ranks(_eval_records, 2, cfg, str(tmp_path / layout))[0]
    assert [r["step"] for r in parallel] == [r["step"] for r in single] == [3, 6]
    for got, want in zip(parallel, single, strict=True):
        keys = [k for k in want if k.startswith("val_loss") or k.endswith("/specialisation")]
        assert {"val_loss/words", "val_loss/digits", "val_loss/symbols", "moe/block1/specialisation"} <= set(keys)
        for key in keys:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=f"{layout}: {key}")
        for key in (k for k in want if "/expert_load/" in k):
            np.testing.assert_allclose(got[key], want[key], atol=1e-5, err_msg=f"{layout}: {key}")
