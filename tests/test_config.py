from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from sparse_train.cli import main
from sparse_train.config import Config, ConfigError, ModelConfig, MoEConfig, compose_config, load_config


def test_defaults_validate_and_roundtrip_through_yaml():
    cfg = load_config(None)
    again = load_config(None, [])
    assert cfg == again
    assert Config(**{k: v for k, v in vars(cfg).items()}) == cfg
    assert yaml.safe_load(cfg.to_yaml())["router"]["top_k"] == cfg.router.top_k


def test_precedence_cli_over_yaml_over_defaults(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  steps: 7\n  seed: 3\noptimizer:\n  lr: 3e-4\n")
    cfg = load_config(recipe, ["train.steps=11"])
    assert cfg.train.steps == 11  # CLI wins over the file
    assert cfg.train.seed == 3  # file wins over the default
    assert cfg.optimizer.lr == pytest.approx(3e-4)  # `3e-4` (a string to PyYAML) is read as a number
    assert cfg.train.batch_size == Config().train.batch_size  # default where neither says


def test_required_field_names_exist():
    cfg = load_config(None, ["train.steps=5", "train.seed=9", "train.log_every=2", "checkpoint.every=4"])
    assert (cfg.train.steps, cfg.train.seed, cfg.train.log_every, cfg.checkpoint.every) == (5, 9, 2, 4)
    assert hasattr(cfg.data, "path")


def test_override_values_are_parsed_as_yaml():
    cfg = load_config(None, ["model.sparse_layers=[1, 3]", "moe.capacity_factor=null", "model.tie_embeddings=true"])
    assert cfg.model.sparse_layers == [1, 3]
    assert cfg.moe.capacity_factor is None
    assert cfg.model.tie_embeddings is True


def test_sections_validate_on_direct_construction():
    with pytest.raises(ConfigError, match="capacity_factor"):
        MoEConfig(capacity_factor=-1.0)


def test_sparse_layer_selection():
    assert [i for i in range(4) if ModelConfig(sparse_every_n=1).is_sparse_layer(i)] == [0, 1, 2, 3]
    assert [i for i in range(4) if ModelConfig(sparse_every_n=2).is_sparse_layer(i)] == [1, 3]
    assert [i for i in range(4) if ModelConfig(sparse_layers=[0, 2]).is_sparse_layer(i)] == [0, 2]


@pytest.mark.parametrize("old, new, value", [("every_n", "sparse_every_n", 2), ("layers", "sparse_layers", [0, 3])])
def test_old_moe_placement_keys_still_work_with_a_warning_naming_the_new_key(tmp_path, old, new, value):
    recipe = tmp_path / "old.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"n_layers": 4}, "moe": {old: value}}))
    message = f"moe.{old} is deprecated: use model.{new}"
    with pytest.warns(FutureWarning, match=message):
        from_file = load_config(recipe)
    with pytest.warns(FutureWarning, match=message):
        from_override = load_config(None, ["model.n_layers=4", f"moe.{old}={value}"])
    assert getattr(from_file.model, new) == getattr(from_override.model, new) == value
    assert "every_n" not in from_file.to_dict()["moe"] and "layers" not in from_file.to_dict()["moe"]


def test_old_and_new_placement_keys_that_disagree_are_refused():
    with pytest.raises(ConfigError, match="moe.layers: is deprecated and conflicts with model.sparse_layers"):
        compose_config({"moe": {"layers": [1]}, "model": {"sparse_layers": [0]}})


def test_deprecation_warning_is_one_line_on_the_command_line():
    done = subprocess.run(
        [sys.executable, "-m", "sparse_train", "config", "--set", "moe.every_n=2"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == "warning: moe.every_n is deprecated: use model.sparse_every_n\n"
    assert "sparse_every_n: 2" in done.stdout


INVALID = [
    (["--set", "train.stepz=5"], "train.stepz: unknown key (did you mean 'steps'?)"),
    (["--set", "nosuch.x=1"], "nosuch: unknown key"),
    (["--set", "train.steps=ten"], "train.steps: must be an integer"),
    (["--set", "train.steps=2.5"], "train.steps: must be an integer"),
    (["--set", "model.tie_embeddings=3"], "model.tie_embeddings: must be true or false"),
    (["--set", "router.top_k=9"], "router.top_k: must be <= moe.num_experts (8), got 9"),
    (["--set", "moe.capacity_factor=0"], "moe.capacity_factor: must be > 0"),
    (["--set", "moe.capacity_factor=-1.5"], "moe.capacity_factor: must be > 0"),
    (["--set", "model.d_model=100", "--set", "model.n_heads=3"], "model.d_model: must be divisible by model.n_heads"),
    (["--set", "data.path=/no/such/corpus.txt"], "data.path: no such file or directory"),  # checked at loading
    (["--set", "moe.drop_policy=random"], "moe.drop_policy: must be one of 'position', 'probability'"),
    (["--set", "router.balance_scope=everything"], "router.balance_scope: must be one of"),
    (["--set", "train.batch_size=0"], "train.batch_size: must be > 0"),
    (["--set", "data.val_fraction=1.5"], "data.val_fraction: must be in (0, 1)"),
    (["--set", "data.seq_len=512"], "data.seq_len: must be <= model.max_seq_len"),
    (["--set", "model.sparse_layers=[0, 9]"], "model.sparse_layers: indices must be < model.n_layers"),
    (["--set", "train.steps.deeper=1"], "train.steps: is not a section"),
    (["--set", "train.steps"], "--set: expected KEY=VALUE"),
    (["--config", "/no/such.yaml"], "--config: no such file"),
    (["--set", "fff.depth=0"], "fff.depth: must be in [1, 20], got 0"),
    (["--set", "fff.depth=21"], "fff.depth: must be in [1, 20], got 21"),
    (["--set", "fff.leaf_width=0"], "fff.leaf_width: must be > 0, got 0"),
    (["--set", "fff.leaf_width=-3"], "fff.leaf_width: must be > 0, got -3"),
    (["--set", "fff.top_k=9"], "fff.top_k: must be in [1, 2^depth = 8], got 9"),
    (["--set", "fff.mode=stochastic"], "fff.mode: must be one of 'soft', 'topk_paths', 'hard'"),
    (["--set", "model.ffn=tree"], "model.ffn: must be one of 'dense', 'moe', 'fff'"),
    (  # 4 groups of 1 expert, each scored by its best top_k / group_top_k = 2
        ["--config", "configs/tiny-deepseek-v3.yaml", "--set", "moe.num_experts=4"],
        "router.num_groups: leaves 1 experts per group, fewer than router.top_k / router.group_top_k (2)",
    ),
]


@pytest.mark.parametrize(("args", "expected"), INVALID, ids=[e for _, e in INVALID])
def test_invalid_config_exits_2_with_one_line(args, expected, capsys):
    code = main(["train", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("moe:\n  num_experts: many\n", "moe.num_experts: must be an integer"),
        ("moe:\n  nmu_experts: 4\n", "moe.nmu_experts: unknown key (did you mean 'num_experts'?)"),
        ("train: [1, 2]\n", "train: must be a mapping"),
        ("- just\n- a list\n", "must hold a mapping of sections"),
        ("model:\n  d_model: [\n", "is not valid YAML at line"),
    ],
)
def test_invalid_yaml_files(tmp_path, capsys, text, expected):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    assert main(["train", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1


def test_real_process_exit_code_and_stderr():
    proc = subprocess.run(
        [sys.executable, "-m", "sparse_train", "train", "--set", "router.top_k=0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "config error: router.top_k: must be > 0, got 0"
    assert proc.stdout == ""


def test_every_shipped_recipe_validates():
    from pathlib import Path

    recipes = sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml"))
    assert {"tiny-moe.yaml", "tiny-dense.yaml"} <= {p.name for p in recipes}
    for recipe in recipes:
        load_config(recipe)


def test_config_command_prints_fields(capsys):
    assert main(["config", "--fields"]) == 0
    out = capsys.readouterr().out
    assert "router.balance_scope" in out and "checkpoint.every" in out


@pytest.mark.parametrize("recipe", sorted(p.name for p in (Path(__file__).parents[1] / "configs").glob("*.yaml")))
def test_every_shipped_recipe_loads_and_validates(recipe):
    cfg = load_config(Path(__file__).parents[1] / "configs" / recipe)
    assert cfg.train.steps > 0 and cfg.model.d_model % cfg.model.n_heads == 0


def test_renormalised_top1_routing_warns_that_the_router_cannot_learn():
    with pytest.warns(UserWarning, match="router gets no gradient"):
        load_config(None, ["router.top_k=1"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(None, ["router.top_k=1", "router.renormalize=false"])  # Switch-style: trains the router
        load_config(None, ["router.top_k=2"])
