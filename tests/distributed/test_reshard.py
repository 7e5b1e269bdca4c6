"""Sharded (DCP) checkpoints reshard: a run saved in one layout resumes in another (or in one
process) and continues exactly as the uninterrupted single-process run: the same losses after
the resume point and the same final weights, expert weights and FFF leaves included."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_train.launch.local import run_ranks
from sparse_train.train import checkpoint as ckpt
from tests.distributed.test_layouts import FFF, _assert_same_tensors, _config, _data

TOTAL, SAVED = 6, 3
RUN = [
    f"train.steps={TOTAL}",
    f"checkpoint.every={SAVED}",
    "checkpoint.save_final=true",
    "train.log_every=1",
    "train.eval_every=0",
]


def _fit(cfg, run_dir: str, data, resume: str | None, stop_at: int | None = None):
    """Train to cfg.train.steps or `stop_at` (resuming if asked); (losses by step, final whole
    weights) on rank 0."""
    from sparse_train.train.trainer import Trainer

    trainer = Trainer(cfg, Path(run_dir), data=data, resume=resume, log=lambda msg: None)
    try:
        trainer.fit(stop_at)
        weights = trainer.engine.full_state_dict()
    finally:
        trainer.close()
    if not trainer.is_main:
        return None
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}, weights


def _run(world: int, cfg, run_dir: Path, data, resume: str | None, stop_at: int | None = None):
    if world == 1:
        return _fit(cfg, str(run_dir), data, resume, stop_at)
    return run_ranks(_fit, world, cfg, str(run_dir), data, resume, stop_at)[0]


CASES = {
    # name: (model overrides, (processes, parallel) saving, (processes, parallel) resuming)
    "moe-ep2-to-ep4": ([], (2, ["parallel.ep=2"]), (4, ["parallel.ep=4"])),
    "moe-ep2-to-one-process": ([], (2, ["parallel.ep=2"]), (1, [])),
    "fff-one-process-to-ep2": ([*FFF, "fff.mode=topk_paths"], (1, []), (2, ["parallel.ep=2"])),
    "moe-tp2-ep2-to-pp2": (
        ["moe.num_shared_experts=1"],
        (4, ["parallel.tp=2", "parallel.ep=2"]),
        (2, ["parallel.pp=2"]),
    ),
    "fff-ep2-to-dp2": (
        [*FFF, "fff.mode=hard", "fff.master_leaf=true"],
        (2, ["parallel.ep=2"]),
        (2, ["parallel.dp_shard=2"]),
    ),
}
FAST = {"moe-ep2-to-one-process"}  # one 2-process case in `make test`; the others (FFF, 4 processes) are slow


@pytest.mark.parametrize("case", [pytest.param(n, marks=[] if n in FAST else [pytest.mark.slow]) for n in CASES])
def test_a_checkpoint_resumes_in_another_layout_as_the_uninterrupted_run(case, tmp_path):
    model, (world_a, layout_a), (world_b, layout_b) = CASES[case]
    data = _data()
    ref_losses, ref_weights = _run(1, _config(model, RUN), tmp_path / "single", data, None)

    run = tmp_path / "run"
    _run(world_a, _config(model, [*RUN, *layout_a]), run, data, None, stop_at=SAVED)  # "interrupted" there
    saved = run / "checkpoints" / ckpt.step_dir_name(SAVED)
    assert json.loads((saved / ckpt.LAYOUT).read_text())["world_size"] == world_a
    # the saved weights, read whole in this process, are the single-process run's at that step
    reference_at_save = ckpt.read_weights(tmp_path / "single" / "checkpoints" / ckpt.step_dir_name(SAVED))
    _assert_same_tensors(ckpt.read_weights(saved), reference_at_save, f"{case}: weights at step {SAVED}")

    losses, weights = _run(world_b, _config(model, [*RUN, *layout_b]), run, data, "auto")
    after = sorted(s for s in losses if s > SAVED)
    assert after == list(range(SAVED + 1, TOTAL + 1)), "the resumed run continues from the checkpoint's step"
    np.testing.assert_allclose([losses[s] for s in after], [ref_losses[s] for s in after], rtol=1e-5)
    _assert_same_tensors(weights, ref_weights, f"{case}: final weight")
    assert ref_losses[TOTAL] < ref_losses[1], "the reference run must actually train"


@pytest.mark.slow  # `make test` stays under 4 minutes
def test_the_optimizer_state_reshards_too(tmp_path):
    """Adam's moments saved at ep=2 equal the single-process run's, read back whole."""
    data = _data()
    _run(1, _config([], RUN), tmp_path / "single", data, None, stop_at=SAVED)
    _run(2, _config([], [*RUN, "parallel.ep=2"]), tmp_path / "ep2", data, None, stop_at=SAVED)
    from sparse_train.train import sharded

    single = sharded.read_full(tmp_path / "single" / "checkpoints" / ckpt.step_dir_name(SAVED), sharded.OPTIM_DIR)
    ep2 = sharded.read_full(tmp_path / "ep2" / "checkpoints" / ckpt.step_dir_name(SAVED), sharded.OPTIM_DIR)
    moments = {k: v for k, v in single.items() if k.endswith(("exp_avg", "exp_avg_sq"))}
    assert any("experts.w_down" in k for k in moments)
    _assert_same_tensors({k: ep2[k] for k in moments}, moments, "Adam moments")
    assert torch.equal(ep2["state.embed.weight.step"], single["state.embed.weight.step"])


def test_ckpt_info_and_convert_read_a_sharded_checkpoint(tmp_path, capsys):
    from safetensors.torch import load_file

    from sparse_train.cli import main

    _run(2, _config([], [*RUN, "parallel.ep=2"]), tmp_path / "run", _data(), None, stop_at=SAVED)
    capsys.readouterr()
    assert main(["ckpt", "info", str(tmp_path / "run")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["format"], info["step"]) == (3, SAVED)
    assert info["layout"]["world_size"] == 2 and info["layout"]["ep"] == 2
    assert info["tensors"]["blocks.0.ffn.experts.w_down"] == "float32[4, 32, 32]"  # global shape, all 4 experts
    out = tmp_path / "whole.safetensors"
    assert main(["ckpt", "convert", str(tmp_path / "run"), "--to", str(out)]) == 0
    whole = load_file(str(out))
    assert set(whole) == set(info["tensors"]) and sum(t.numel() for t in whole.values()) == info["parameters"]
    for name, t in ckpt.read_weights(tmp_path / "run" / "checkpoints" / ckpt.step_dir_name(SAVED)).items():
        assert torch.equal(whole[name], t), name
    assert main(["ckpt", "convert", str(tmp_path / "run"), "--to", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
