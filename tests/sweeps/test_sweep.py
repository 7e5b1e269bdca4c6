"""Sweep specs expand into the right trials, bad specs and directories get one-line errors, and a
tiny real sweep runs end to end (Ray or local subprocesses), resumes, fits and plots."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import yaml

from sparse_train.cli import main
from sparse_train.sweeps.runner import plan, write_results
from sparse_train.sweeps.spec import expand, load_spec

os.environ.update({"RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"})  # before Ray is imported
ROOT = Path(__file__).resolve().parents[2]
TINY_SETS = [
    "model.max_seq_len=32",
    "data.seq_len=32",
    "train.batch_size=4",
    "train.log_every=2",
    "train.eval_every=0",
    "train.eval_batches=2",
    "checkpoint.every=0",
    "optimizer.warmup_steps=2",
    "model.n_heads=2",
]
SIZES = [
    {"model.d_model": 32, "model.n_layers": 1, "model.ffn_hidden": 64},
    {"model.d_model": 48, "model.n_layers": 2, "model.ffn_hidden": 96},
]


def _spec(tmp_path: Path, **changes) -> Path:
    spec = {
        "name": "tiny",
        "base": str(ROOT / "configs" / "tiny-moe.yaml"),
        "set": TINY_SETS,
        "axes": {
            "size": SIZES,
            "model.ffn": ["dense", "moe"],
            "moe.num_experts": [4],
            "granularity": [2],
            "train.steps": [6, 12],
        },
        "seeds": [0],
    }
    spec.update(changes)
    path = tmp_path / f"spec-{len(list(tmp_path.glob('spec-*')))}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_the_grid_expands_with_derived_axes_and_no_duplicate_dense_points(tmp_path):
    spec = load_spec(
        _spec(
            tmp_path,
            axes={
                "size": SIZES,
                "model.ffn": ["dense", "moe"],
                "moe.num_experts": [4, 8],
                "granularity": [1, 2],
                "train.steps": [6],
            },
        )
    )
    points = expand(spec)
    dense = [p for p in points if p.overrides["model.ffn"] == "dense"]
    moe = [p for p in points if p.overrides["model.ffn"] == "moe"]
    assert len(dense) == 2, "one dense point per size: the MoE axes do not apply to it"
    assert len(moe) == 2 * 2 * 2
    fine = next(p for p in moe if p.values["granularity"] == 2 and p.values["size"] == SIZES[0])
    assert fine.overrides["moe.expert_hidden"] == 32 and fine.overrides["router.top_k"] == 2  # active FFN = dense
    trials = plan(spec, tmp_path / "out")
    by_id = {t.point.trial_id: t for t in trials}
    dense_small = by_id[dense[0].trial_id].compute
    moe_small = by_id[fine.trial_id].compute
    assert moe_small["params_total"] > dense_small["params_total"]
    assert moe_small["params_active"] == pytest.approx(dense_small["params_active"], rel=0.02)  # + the router
    assert dense_small["tokens"] == 6 * 4 * 32 and dense_small["flops"] > 6 * dense_small["params_active"] * 768


def test_fff_depth_and_token_axes_apply_only_where_they_mean_something(tmp_path):
    spec = load_spec(
        _spec(
            tmp_path,
            axes={
                "size": SIZES[:1],
                "model.ffn": ["dense", "moe", "fff"],
                "fff.depth": [2, 3],
                "granularity": [2],
                "tokens": [1000],
            },
        )
    )
    points = expand(spec)
    by_ffn = {f: [p for p in points if p.overrides["model.ffn"] == f] for f in ("dense", "moe", "fff")}
    assert [len(by_ffn[f]) for f in ("dense", "moe", "fff")] == [1, 1, 2]
    assert all("fff.depth" not in p.overrides for p in by_ffn["dense"] + by_ffn["moe"])
    assert all("router.top_k" not in p.overrides for p in by_ffn["fff"])
    # inapplicable axes are recorded empty
    assert by_ffn["dense"][0].values == {
        "size": SIZES[0],
        "model.ffn": "dense",
        "fff.depth": None,
        "granularity": None,
        "tokens": 1000,
    }
    assert {p.overrides["train.steps"] for p in points} == {8}, "ceil(1000 tokens / (4 x 32) per step)"
    trials = {t.point.trial_id: t for t in plan(spec, tmp_path / "out")}
    (tmp_path / "out").mkdir()
    write_results(spec, list(trials.values()), tmp_path / "out")
    rows = {(r["ffn"], r["num_experts"]): r for r in _rows(tmp_path / "out")}
    assert set(rows) == {("dense", "1"), ("moe", "8"), ("fff", "4"), ("fff", "8")}  # tiny-moe: 8 experts
    assert all(int(r["tokens"]) == 8 * 4 * 32 and r["status"] == "pending" for r in rows.values())
    deep, shallow = rows[("fff", "8")], rows[("fff", "4")]
    assert int(deep["params_total"]) > int(shallow["params_total"])  # twice the leaves
    # one leaf active either way: only the extra node neurons (d_model + 1 each) differ
    assert int(deep["params_active"]) - int(shallow["params_active"]) == 4 * (SIZES[0]["model.d_model"] + 1)
    assert float(deep["granularity"]) == SIZES[0]["model.ffn_hidden"] / 64  # ffn_hidden / fff.leaf_width


def test_bad_specs_and_directories_are_one_line_errors_with_status_2(tmp_path, capsys):
    out = tmp_path / "out"
    cases = [
        (_spec(tmp_path, axes={"model.widht": [1]}), "axis model.widht: model.widht is not a config field"),
        (_spec(tmp_path, axes={"size": [{"model.nope": 1}]}), "axis size: model.nope is not a config field"),
        (_spec(tmp_path, budget_flops=1.0), "no point fits budget_flops=1: the smallest needs"),
        (_spec(tmp_path, axes={"tokens": [0]}), "axis tokens: values must be numbers >= 1, got [0]"),
        (tmp_path / "missing.yaml", "no such sweep spec"),
    ]
    capsys.readouterr()
    for spec, message in cases:
        assert main(["sweep", "run", str(spec), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert (
        main(["sweep", "run", str(_spec(tmp_path)), "--out", str(out), "--executor", "local", "--gpus-per-trial", "1"])
        == 2
    )
    assert "--gpus-per-trial needs the ray executor" in capsys.readouterr().err
    assert not out.exists(), "nothing written for a sweep that cannot run"
    # a results directory made by another spec
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps({"name": "other", "digest": "0", "spec": "x.yaml"}))
    assert main(["sweep", "run", str(_spec(tmp_path)), "--out", str(out)]) == 2
    assert "holds results of another spec (other, x.yaml)" in capsys.readouterr().err
    # too few points to fit
    (out / "results.csv").write_text(
        "trial_id,status,ffn,params_active,tokens,num_experts,granularity,flops,"
        "final_val_loss\na,done,dense,10,10,1,1,600,3.0\n"
    )
    assert main(["sweep", "fit", str(out)]) == 2
    assert "needs at least 5 finished trials, the results hold 1" in capsys.readouterr().err
    (out / "results.csv").write_text("trial_id,status\na,done\n")
    assert main(["sweep", "fit", str(out)]) == 2
    assert "lacks the columns ['ffn', 'params_active'" in capsys.readouterr().err


def _rows(out: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((out / "results.csv").open()))


@pytest.mark.slow
def test_a_tiny_sweep_runs_on_ray_resumes_fits_and_plots(tmp_path, capsys):
    pytest.importorskip("ray.train")
    spec, out = _spec(tmp_path), tmp_path / "out"
    assert main(["sweep", "run", str(spec), "--out", str(out)]) == 0  # as many at once as the cluster's CPUs
    rows = _rows(out)
    assert len(rows) == 8 and {r["status"] for r in rows} == {"done"}
    assert all(float(r["final_val_loss"]) > 0 and float(r["flops"]) > 0 for r in rows)
    assert {r["ffn"] for r in rows} == {"dense", "moe"}

    # half-finished: one trial failed, one never ran; the rerun runs exactly those two
    ids = sorted(r["trial_id"] for r in rows)
    failed = out / "trials" / ids[0] / "trial.json"
    failed.write_text(json.dumps({**json.loads(failed.read_text()), "status": "failed", "error": "boom"}))
    (out / "trials" / ids[1] / "trial.json").unlink()
    before = {i: (out / "trials" / i / "train.log").stat().st_mtime_ns for i in ids}
    assert main(["sweep", "run", str(spec), "--out", str(out), "--executor", "local", "--max-parallel", "2"]) == 0
    rerun = sorted(i for i in ids if (out / "trials" / i / "train.log").stat().st_mtime_ns != before[i])
    assert rerun == ids[:2]
    assert {r["status"] for r in _rows(out)} == {"done"}

    capsys.readouterr()
    assert main(["sweep", "fit", str(out), "--bootstrap", "20"]) == 0
    result = json.loads((out / "fit-chinchilla.json").read_text())
    assert result["points"] == 8 and set(result["ci95"]) == set(result["params"])
    assert main(["sweep", "optimal", str(out), "--flops", "1e12"]) == 0
    best = json.loads(capsys.readouterr().out.split("written to")[-1].split("\n", 1)[1])
    assert best["flops"] == 1e12 and best["params_active"] * best["tokens"] * 6 == pytest.approx(1e12)
    # per-family fits need 5 points per family for chinchilla; this sweep has 4 of each
    assert main(["sweep", "fit", str(out), "--by-family", "--bootstrap", "0"]) == 2
    assert "family dense: the chinchilla law has 5 parameters" in capsys.readouterr().err
    assert main(["sweep", "plot", str(out)]) == 0
    for name in ("loss_vs_compute", "residuals", "moe_vs_dense"):
        for suffix in (".png", ".svg"):
            assert (out / "plots" / f"{name}{suffix}").stat().st_size > 5_000


@pytest.mark.slow
def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(tmp_path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("too short")
    spec = _spec(
        tmp_path, axes={"size": SIZES[:1], "model.ffn": ["dense"], "train.steps": [4], "data.path": [None, str(tiny)]}
    )
    out = tmp_path / "out"
    assert main(["sweep", "run", str(spec), "--out", str(out), "--executor", "local"]) == 1  # a trial failed
    rows = {r["axis:data.path"]: r for r in _rows(out)}
    assert rows[""]["status"] == "done"
    assert rows[str(tiny)]["status"] == "failed" and "corpus too small" in rows[str(tiny)]["error"]


@pytest.mark.slow
def test_a_trial_asking_for_more_gpus_than_the_cluster_has_is_refused_before_anything_runs(tmp_path, capsys):
    pytest.importorskip("ray.train")
    out = tmp_path / "out"
    assert main(["sweep", "run", str(_spec(tmp_path)), "--out", str(out), "--gpus-per-trial", "1"]) == 2
    assert "1 GPUs; the cluster has 0" in capsys.readouterr().err
    assert not (out / "trials").exists()
