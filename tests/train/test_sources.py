"""Per-source evaluation of a data mixture: val_loss/<source>, per-source expert load, and the
specialisation score (sparse_train.train.sources)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from sparse_train.train.sources import SourceEvaluation, kl_divergence, source_records, specialisation
from sparse_train.train.trainer import Trainer
from tests.conftest import tiny_config


def test_specialisation_is_zero_for_identical_distributions():
    p = np.array([[0.1, 0.2, 0.3, 0.4]] * 3)
    assert specialisation(p) == pytest.approx(0.0, abs=1e-15)
    assert specialisation(p * 7) == pytest.approx(0.0, abs=1e-15)  # counts or shares alike
    assert specialisation(np.array([[0.25] * 4] * 2)) == 0.0


def test_specialisation_of_a_hand_made_example():
    # p1 = (1/2, 1/2), p2 = (1, 0): overall (3/4, 1/4);
    # KL(p1 || o) = 1/2 ln(2/3) + 1/2 ln 2, KL(p2 || o) = ln(4/3)
    expected = (0.5 * math.log(2 / 3) + 0.5 * math.log(2) + math.log(4 / 3)) / 2
    assert specialisation(np.array([[0.5, 0.5], [1.0, 0.0]])) == pytest.approx(expected, rel=1e-12)
    assert expected > 0
    # sources on disjoint experts: the most a score can be, ln(number of sources)
    assert specialisation(np.eye(3)) == pytest.approx(math.log(3))
    with pytest.raises(ValueError, match="infinite"):
        kl_divergence(np.array([0.5, 0.5]), np.array([1.0, 0.0]))


def test_records_name_every_source_and_layer():
    result = SourceEvaluation(
        {"code": 2.0, "prose": 3.0},
        {"code": np.array([[2.0, 2.0], [1.0, 0.0]]), "prose": np.array([[0.5, 0.5], [0.0, 1.0]])},
    )
    record = source_records(result, ["block0", "block1"], "moe")
    assert record["val_loss"] == 2.5 and record["val_loss/code"] == 2.0 and record["val_loss/prose"] == 3.0
    assert record["moe/block0/expert_load/code"] == [0.5, 0.5]
    assert record["moe/block0/specialisation"] == 0.0
    assert record["moe/block1/specialisation"] == pytest.approx(math.log(2))
    np.testing.assert_allclose(result.load_LE, [[0.5, 0.5], [0.5, 0.5]])


def _write_sources(tmp_path) -> list[str]:
    """Three sources of different kind: lowercase words, digits, punctuation-heavy lines."""
    rng = np.random.default_rng(0)
    alphabets = {"words": "abcdefgh ", "digits": "0123456789 ", "symbols": "{}();=<>+- "}
    sources = []
    for name, alphabet in alphabets.items():
        folder = tmp_path / name
        folder.mkdir(parents=True)
        for i in range(40):
            (folder / f"{i:02d}.txt").write_text("".join(rng.choice(list(alphabet), 300)))
        sources.append(f"{{name: {name}, path: {folder}, weight: {len(sources) + 1}}}")
    return sources


def mixture_config(tmp_path, *extra: str):
    return tiny_config(
        "data.mixture=[" + ", ".join(_write_sources(tmp_path)) + "]",
        "train.steps=6",
        "train.eval_every=3",
        "checkpoint.every=0",
        "checkpoint.save_final=false",
        *extra,
    )


def test_training_on_a_mixture_logs_validation_per_source(tmp_path):
    cfg = mixture_config(tmp_path / "data", "logging.tensorboard=true")
    trainer = Trainer(cfg, tmp_path / "run", log=lambda msg: None)
    summary = trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    names = ("words", "digits", "symbols")
    for record in evals:
        per_source = [record[f"val_loss/{n}"] for n in names]
        assert record["val_loss"] == pytest.approx(sum(per_source) / 3, rel=1e-12)
        assert len(set(per_source)) == 3  # different text, different loss
        for block in ("block0", "block1"):
            for n in names:
                load = record[f"moe/{block}/expert_load/{n}"]
                assert len(load) == 4 and sum(load) == pytest.approx(1.0, abs=1e-4)
            assert record[f"moe/{block}/specialisation"] > 0
    assert summary.val_loss == evals[-1]["val_loss"]
    # each source's loss is the engine's evaluation of its own validation batches alone
    loss, _ = trainer.engine.evaluate(trainer.source_val_batches["digits"], trainer.autocast)
    assert loss == pytest.approx(evals[-1]["val_loss/digits"], rel=1e-6)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = EventAccumulator(str(tmp_path / "run" / "tb")).Reload().Tags()["scalars"]
    assert {"val_loss", "val_loss/digits", "moe/block1/specialisation"} <= set(scalars)


def test_batches_follow_the_mixture(tmp_path):
    trainer = Trainer(mixture_config(tmp_path / "data"), tmp_path / "run", log=lambda msg: None)
    digits, symbols = set(b"0123456789 "), set(b"{}();=<>+- ")
    kinds = []
    for _ in range(50):
        inputs, _ = trainer.sampler.next_batch()
        for row in inputs.tolist():
            chars = set(row) - {trainer.tokenizer.eot_id, ord(" ")}
            kinds.append(2 if chars <= symbols else 1 if chars <= digits else 0)
    share = np.bincount(kinds, minlength=3) / len(kinds)
    np.testing.assert_allclose(share, [1 / 6, 2 / 6, 3 / 6], atol=0.05)


def test_a_resumed_mixture_run_reproduces_the_uninterrupted_one(tmp_path):
    cfg = mixture_config(tmp_path / "data", "checkpoint.every=3")
    Trainer(cfg, tmp_path / "full", log=lambda msg: None).fit()
    checkpoint = tmp_path / "full" / "checkpoints" / "step_00000003"
    Trainer(cfg, tmp_path / "resumed", resume=str(checkpoint), log=lambda msg: None).fit()

    def records(run: str, key: str) -> dict[int, dict]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r for r in map(json.loads, lines) if key in r}

    full, resumed = records("full", "loss"), records("resumed", "loss")
    assert list(resumed) == [4, 5, 6]
    assert all(resumed[step]["loss"] == full[step]["loss"] for step in resumed)
    assert records("resumed", "val_loss")[6] == records("full", "val_loss")[6]


def test_fff_layers_and_dense_models_report_per_source(tmp_path):
    fff = ["model.ffn=fff", "fff.depth=2", "fff.leaf_width=16", "fff.kernel_backend=torch"]
    for kind, extra in (("fff", fff), ("dense", ["model.ffn=dense"])):
        run = tmp_path / kind
        Trainer(mixture_config(tmp_path / f"data-{kind}", *extra), run, log=lambda msg: None).fit()
        lines = (run / "metrics.jsonl").read_text().splitlines()
        record = [r for r in map(json.loads, lines) if "val_loss" in r][-1]
        assert {"val_loss/words", "val_loss/digits", "val_loss/symbols"} <= set(record)
        layers = [k for k in record if k.endswith("/specialisation")]
        if kind == "fff":  # the tree's leaves are its experts
            assert layers == ["fff/block0/specialisation", "fff/block1/specialisation"]
            assert len(record["fff/block0/leaf_usage/digits"]) == 4
        else:
            assert layers == []
