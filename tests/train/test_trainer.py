from __future__ import annotations

import json
import shutil

import pytest
import torch

from sparse_train.config import ConfigError
from sparse_train.train.trainer import Trainer, TrainingStopped
from tests.conftest import tiny_config


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(run_dir) if "loss" in r}


def test_short_run_loss_falls_and_metrics_are_complete(tmp_path):
    cfg = tiny_config("train.steps=40", "optimizer.lr=1e-2", "logging.tensorboard=true", "logging.plots=true")
    summary = Trainer(cfg, tmp_path).fit()
    losses = _losses(tmp_path)
    assert sum(list(losses.values())[-5:]) / 5 < losses[1] - 1.0
    assert summary.first_loss == losses[1] and summary.last_loss == losses[40]
    record = _records(tmp_path)[-2]
    for key in ("step", "loss", "lm_loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_s"):
        assert key in record, key
    for block in (0, 1):
        load = record[f"moe/block{block}/expert_load"]
        assert len(load) == 4 and sum(load) == pytest.approx(1.0, abs=1e-3)
        assert record[f"moe/block{block}/dropped_fraction"] == 0.0
        assert 0 < record[f"moe/block{block}/router_entropy"] <= torch.log(torch.tensor(4.0)).item() + 1e-6
    assert [r["step"] for r in _records(tmp_path) if "val_loss" in r] == [10, 20, 30, 40]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0}).Reload()
    assert "moe/expert_load" in events.Tags()["images"]
    assert [e.step for e in events.Images("moe/expert_load")] == [10, 20, 30, 40]  # one heatmap per evaluation
    assert {"lm_loss", "val_loss", "moe/block0/load_imbalance"} <= set(events.Tags()["scalars"])
    assert (tmp_path / "plots" / "expert_load.png").stat().st_size > 0
    assert (tmp_path / "plots" / "loss.png").stat().st_size > 0
    assert summary.checkpoint.name == "step_00000040"


def test_resume_reproduces_the_uninterrupted_run_bitwise(tmp_path):
    full = tmp_path / "full"
    Trainer(tiny_config(), full).fit()
    resumed = tmp_path / "resumed"
    Trainer(tiny_config(), resumed, resume=str(full / "checkpoints" / "step_00000010")).fit()
    a, b = _losses(full), _losses(resumed)
    assert list(b) == list(range(11, 21))
    assert all(a[s] == b[s] for s in b), {s: (a[s], b[s]) for s in b if a[s] != b[s]}


def test_auto_resume_skips_a_corrupted_newest_checkpoint(tmp_path):
    Trainer(tiny_config(), tmp_path).fit()
    original = _losses(tmp_path)
    weights = next((tmp_path / "checkpoints" / "step_00000020" / "model").glob("*.distcp"))
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    weights.write_bytes(bytes(raw))
    messages = []
    trainer = Trainer(tiny_config("train.steps=25"), tmp_path, resume="auto", log=messages.append)
    assert trainer.step == 10
    assert any("step_00000020" in m and "corrupted" in m for m in messages)
    trainer.fit()
    again = _losses(tmp_path)
    assert list(again) == list(range(1, 26))  # records after step 10 were replaced, not duplicated
    assert all(again[s] == original[s] for s in range(1, 11))


def test_existing_run_needs_explicit_resume(tmp_path):
    Trainer(tiny_config("train.steps=10"), tmp_path).fit()
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        Trainer(tiny_config(), tmp_path)


def test_resume_with_a_different_model_is_refused(tmp_path):
    Trainer(tiny_config("train.steps=10"), tmp_path).fit()
    with pytest.raises(ConfigError, match=r"moe.num_experts \(checkpoint 4, config 2\)"):
        Trainer(tiny_config("moe.num_experts=2"), tmp_path, resume="auto")


def _poison(trainer: Trainer, bad_steps: set[int]) -> None:
    """Make the loss NaN on the given (1-based) steps."""
    original = trainer.engine.loss_of

    def loss_of(output, targets):
        parts = original(output, targets)
        if trainer.step + 1 in bad_steps:
            parts.loss = parts.loss * float("nan")
        return parts

    trainer.engine.loss_of = loss_of


def test_non_finite_steps_are_skipped_and_counted(tmp_path):
    trainer = Trainer(tiny_config("train.steps=8", "checkpoint.every=0"), tmp_path, log=lambda m: None)
    _poison(trainer, {3, 4})
    before = {}

    def snapshot():
        return [p.detach().clone() for p in trainer.model.parameters()]

    for _ in range(2):
        trainer.train_step()
    before = snapshot()
    r3, r4 = trainer.train_step(), trainer.train_step()
    assert r3["skipped"] and r4["skipped"] and r4["nonfinite_steps"] == 2
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(), strict=True))  # no update applied
    r5 = trainer.train_step()
    assert "loss" in r5 and r5["nonfinite_steps"] == 2


def test_too_many_non_finite_steps_stop_and_keep_the_last_good_checkpoint(tmp_path):
    trainer = Trainer(tiny_config("train.max_nonfinite_steps=3"), tmp_path, log=lambda m: None)
    _poison(trainer, set(range(12, 100)))
    with pytest.raises(TrainingStopped, match="3 non-finite steps in a row"):
        trainer.fit()
    from sparse_train.train import checkpoint as ckpt

    good = ckpt.latest_valid_checkpoint(tmp_path / "checkpoints", warn=print)
    assert good.name == "step_00000010"
    assert [c.step for c in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [10]


def test_steps_that_are_not_reported_skip_on_the_device_and_count(tmp_path):
    """Unreported steps never read their non-finite flag on the host: the skip happens on the
    device and the count reaches the next reported step."""
    trainer = Trainer(tiny_config("train.steps=8", "checkpoint.every=0"), tmp_path, log=lambda m: None)
    _poison(trainer, {2, 3})
    trainer.train_step(report=False)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    moments = [trainer.optimizer.state[p]["exp_avg"].clone() for p in trainer.model.parameters()]
    assert trainer.train_step(report=False) == {"step": 2}
    assert trainer.train_step(report=False) == {"step": 3}
    after = [p.detach() for p in trainer.model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # weights untouched
    assert all(
        torch.equal(m, trainer.optimizer.state[p]["exp_avg"])
        for m, p in zip(moments, trainer.model.parameters(), strict=True)
    )
    r4 = trainer.train_step()
    assert "loss" in r4 and r4["nonfinite_steps"] == 2
    assert not all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))


def test_a_streak_of_non_finite_steps_stops_the_run_at_the_next_report(tmp_path):
    """With log_every=4, steps 6-8 are skipped unread; step 8 is reported and stops the run."""
    logs: list[str] = []
    cfg = tiny_config("train.max_nonfinite_steps=3", "train.log_every=4", "checkpoint.every=0")
    trainer = Trainer(cfg, tmp_path, log=logs.append)
    _poison(trainer, {6, 7, 8})
    with pytest.raises(TrainingStopped, match="stopped at step 8: 3 non-finite steps in a row"):
        trainer.fit()
    assert any("3 step(s) skipped since the last report" in line for line in logs), logs


def test_gradient_accumulation_matches_one_large_batch(tmp_path):
    common = (
        "router.aux_loss_coef=0",
        "router.z_loss_coef=0",
        "train.steps=3",
        "checkpoint.every=0",
        "checkpoint.save_final=false",
        "train.eval_every=0",
    )
    big = Trainer(tiny_config("train.batch_size=4", "train.grad_accum=1", *common), tmp_path / "a")
    small = Trainer(tiny_config("train.batch_size=2", "train.grad_accum=2", *common), tmp_path / "b")
    for _ in range(3):
        ra, rb = big.train_step(), small.train_step()
        assert ra["lm_loss"] == pytest.approx(rb["lm_loss"], rel=1e-5)
    for pa, pb in zip(big.model.parameters(), small.model.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_trains(tmp_path):
    summary = Trainer(tiny_config("train.precision=bf16", "train.steps=15", "optimizer.lr=1e-2"), tmp_path).fit()
    assert summary.last_loss < summary.first_loss - 0.5


def test_capacity_mode_trains_and_reports_drops(tmp_path):
    Trainer(tiny_config("moe.capacity_factor=0.5", "train.steps=3"), tmp_path).fit()
    record = _records(tmp_path)[0]
    assert record["moe/block0/dropped_fraction"] > 0.0


def test_resume_auto_without_checkpoints_starts_fresh(tmp_path):
    trainer = Trainer(tiny_config("train.steps=2"), tmp_path / "new", resume="auto")
    assert trainer.step == 0


def test_copying_a_run_directory_keeps_it_resumable(tmp_path):
    Trainer(tiny_config("train.steps=10"), tmp_path / "a").fit()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert Trainer(tiny_config(), tmp_path / "b", resume="auto").step == 10


@pytest.mark.parametrize("mode", ["soft", "topk_paths", "hard"])
def test_fff_model_trains_and_logs_tree_metrics(tmp_path, mode):
    cfg = tiny_config(
        "model.ffn=fff",
        "fff.depth=2",
        "fff.leaf_width=16",
        f"fff.mode={mode}",
        "fff.master_leaf=true",
        "fff.hardening_coef=0.01",
        "fff.node_lr_scale=2.0",
        "train.steps=30",
        "optimizer.lr=1e-2",
        "logging.tensorboard=true",
        "logging.plots=true",
    )
    trainer = Trainer(cfg, tmp_path)
    lr = trainer.cfg.optimizer.lr
    node_groups = [g for g in trainer.optimizer.param_groups if g["initial_lr"] == pytest.approx(2 * lr)]
    assert sum(len(g["params"]) for g in node_groups) == 2 * 2  # node weights + biases of both blocks
    summary = trainer.fit()
    losses = _losses(tmp_path)
    assert sum(list(losses.values())[-5:]) / 5 < losses[1] - 0.5
    record = _records(tmp_path)[-2]
    for key in ("aux_loss", "hardening_loss"):
        assert key in record and record[key] > 0, key
    assert "z_loss" not in record
    for block in (0, 1):
        usage = record[f"fff/block{block}/leaf_usage"]
        assert len(usage) == 4 and sum(usage) == pytest.approx(1.0, abs=1e-3)
        assert 0 <= record[f"fff/block{block}/sharpness"] <= 1
        assert 0 < record[f"fff/block{block}/leaf_usage_entropy"] <= torch.log(torch.tensor(4.0)).item() + 1e-6
        assert 0 < record[f"fff/block{block}/master_blend"] < 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "histograms": 0}).Reload()
    assert [e.step for e in events.Images("fff/leaf_usage")] == [10, 20, 30]
    histogram = events.Histograms("fff/block0/leaf_usage")[-1].histogram_value
    assert list(histogram.bucket) == pytest.approx(list(_validation_usage(trainer)[0]), abs=1e-6)
    assert (tmp_path / "plots" / "leaf_usage.png").stat().st_size > 0
    assert summary.sparse_kind == "fff" and set(summary.load_imbalance) == {"block0", "block1"}


def _validation_usage(trainer: Trainer):
    """The validation leaf usage per layer, as the last evaluation measured it."""
    return trainer.evaluate()[1]


def test_peak_memory_is_recorded_after_building_and_after_the_first_step(tmp_path):
    from sparse_train.train.summary import format_summary

    summary = Trainer(tiny_config("train.steps=3"), tmp_path).fit()
    memory = [r for r in _records(tmp_path) if "memory/build_peak_mb" in r]
    assert len(memory) == 1 and memory[0]["step"] == 1  # once, after the first step
    (build,), (step,) = memory[0]["memory/build_peak_mb"], memory[0]["memory/step_peak_mb"]
    assert 10 < build <= step  # MB of this process (peak RSS on CPU): a peak never falls
    assert summary.peak_memory_mb == {"build": build, "step": step, "ranks": 1}
    assert f"{build:,.0f} MB built" in format_summary(summary)
