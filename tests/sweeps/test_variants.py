"""`sweep table` and the variants plot on a small fake sweep directory (no training), and the
`variant` axis of sweep specs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sparse_train.cli import main
from sparse_train.sweeps.spec import SweepError, expand, load_spec
from sparse_train.sweeps.variants import format_table, read_trials, summarise

ROOT = Path(__file__).resolve().parents[2]


def _step(step: int, load: float, tokens_per_s: float) -> dict:
    layers = {
        f"moe/block{i}/{k}": v
        for i in (0, 1)
        for k, v in [("load_imbalance", load), ("dropped_fraction", 0.0), ("experts_per_token", 2.0)]
    }
    return {"step": step, "lm_loss": 3.0, "tokens_per_s": tokens_per_s, **layers}


def _eval(val: float, spec_score: float) -> dict:
    return {
        "step": 20,
        "val_loss": val,
        "val_loss/code": val - 0.5,
        "val_loss/prose": val + 0.5,
        "moe/block0/specialisation": spec_score,
        "moe/block1/specialisation": 3 * spec_score,
    }


def _trial(out: Path, trial_id: str, name: str, seed: int, val: float, status: str = "done") -> None:
    d = out / "trials" / trial_id
    (d / "run").mkdir(parents=True)
    values = {"variant": {"name": name, "router.type": "topk"}}
    (d / "trial.json").write_text(json.dumps({"trial_id": trial_id, "seed": seed, "values": values, "status": status}))
    records = [_step(10, 9.0, 100.0), *(_step(10 + i, 1.5, 1000.0) for i in range(1, 6)), _eval(val, 0.01)]
    (d / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def sweep_dir(tmp_path: Path) -> Path:
    out = tmp_path / "sweep"
    for i, (name, seed, val) in enumerate(
        [("micro", 0, 2.0), ("micro", 1, 2.2), ("global", 0, 1.9), ("global", 1, 1.7)]
    ):
        _trial(out, f"t{i}", name, seed, val)
    _trial(out, "t8", "global", 3, 0.1)  # not in results.csv: a point the spec no longer has
    _trial(out, "t9", "global", 2, 0.1, status="failed")  # not counted
    order = ["t2", "t3", "t0", "t1", "t9"]  # the spec's order: the table follows it
    (out / "results.csv").write_text("trial_id,status,axis:variant\n" + "".join(f"{t},x,v\n" for t in order))
    return out


def test_the_table_has_each_variants_mean_and_spread_over_its_finished_seeds(sweep_dir):
    rows = summarise(read_trials(sweep_dir))
    assert [r.variant for r in rows] == ["global", "micro"] and rows[0].seeds == [0, 1]
    micro = rows[1].stats
    assert micro["val_loss"].mean == pytest.approx(2.1) and micro["val_loss"].std == pytest.approx(0.1414, abs=1e-4)
    assert micro["val_loss/prose"].mean == pytest.approx(2.6)
    assert micro["load_max_mean"].mean == pytest.approx(1.5), "the last 5 logged steps, not the first"
    assert micro["specialisation"].mean == pytest.approx(0.02), "mean over the MoE layers"
    assert micro["tokens_per_s"].mean == pytest.approx(1000.0), "median over the logged steps"
    table = format_table(rows)
    assert "| variant | seeds | val loss | val code | val prose | load max/mean |" in table
    assert "| global | 2 | 1.8000 ± 0.1414 | 1.3000 ± 0.1414 | 2.3000 ± 0.1414 | 1.50 ± 0.00 |" in table


def test_sweep_table_and_plot_commands(sweep_dir, capsys):
    assert main(["sweep", "table", str(sweep_dir)]) == 0
    assert "| micro | 2 | 2.1000 ± 0.1414" in capsys.readouterr().out
    assert main(["sweep", "table", str(sweep_dir), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["val_loss"]["values"] == [1.9, 1.7] and rows[0]["val_loss"]["min"] == 1.7
    assert main(["sweep", "plot", str(sweep_dir)]) == 0
    assert (sweep_dir / "plots" / "variants.png").stat().st_size > 1000


def test_a_bad_directory_is_a_one_line_error(tmp_path, capsys):
    assert main(["sweep", "table", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not a sweep directory" in err and "\n" not in err
    _trial(tmp_path / "s", "t0", "micro", 0, 2.0, status="failed")
    assert main(["sweep", "table", str(tmp_path / "s")]) == 2
    assert "no finished trial yet (1 recorded, none done)" in capsys.readouterr().err


def _variant_spec(tmp_path: Path, variants: list) -> Path:
    spec = {
        "name": "v",
        "base": str(ROOT / "configs" / "tiny-moe.yaml"),
        "axes": {"variant": variants},
        "seeds": [0, 1],
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_the_variant_axis_sets_its_fields_and_needs_unique_names(tmp_path):
    variants = [{"name": "micro"}, {"name": "sig", "router.score": "sigmoid", "router.bias_update_rate": 0.001}]
    points = expand(load_spec(_variant_spec(tmp_path, variants)))
    assert len(points) == 4 and points[2].values["variant"]["name"] == "sig"
    assert points[2].overrides == {"router.score": "sigmoid", "router.bias_update_rate": 0.001, "train.seed": 0}
    with pytest.raises(SweepError, match="names must be unique"):
        load_spec(_variant_spec(tmp_path, [{"name": "a"}, {"name": "a"}]))
    with pytest.raises(SweepError, match="each variant must be a mapping with a name"):
        load_spec(_variant_spec(tmp_path, [{"router.type": "sinkhorn"}]))
    with pytest.raises(SweepError, match="router.nope is not a config field"):
        load_spec(_variant_spec(tmp_path, [{"name": "a", "router.nope": 1}]))


def test_the_routers_sweep_spec_loads_with_ten_variants_and_three_seeds():
    spec = load_spec(ROOT / "configs" / "sweeps" / "routers.yaml")
    assert len(spec.axes["variant"]) == 10 and spec.seeds == [0, 1, 2] and len(expand(spec)) == 30


def test_compare_pairs_equal_seeds_and_names_a_missing_variant(sweep_dir, capsys):
    assert main(["sweep", "table", str(sweep_dir), "--compare", "micro", "global", "--json"]) == 0
    val = next(r for r in json.loads(capsys.readouterr().out) if r["metric"] == "val_loss")
    assert val["difference"] == pytest.approx(-0.3) and val["paired_differences"] == pytest.approx([-0.1, -0.5])
    assert val["difference_over_std"] == pytest.approx(-0.3 / 0.1414, abs=1e-3)
    assert main(["sweep", "table", str(sweep_dir), "--compare", "micro", "global"]) == 0
    assert (
        "| val_loss | 2.1000 ± 0.1414 | 1.8000 ± 0.1414 | -0.3000 | -0.1000, -0.5000 | -2.1 |"
        in capsys.readouterr().out
    )
    assert main(["sweep", "table", str(sweep_dir), "--compare", "micro", "nope"]) == 2
    assert "no variant 'nope' in the sweep; it has: global, micro" in capsys.readouterr().err
