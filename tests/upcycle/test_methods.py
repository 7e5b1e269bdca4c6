"""Upcycling guarantees: copy reproduces the dense logits (natively and as HF Mixtral), split with
every expert active reproduces them too; options that should change the function do."""

from __future__ import annotations

import pytest
import torch

from sparse_train.config import ConfigError
from sparse_train.models.transformer import Transformer
from sparse_train.upcycle.carve import balanced_kmeans
from sparse_train.upcycle.io import load_source, write_model
from sparse_train.upcycle.methods import UpcycleSpec, upcycle
from tests.upcycle.conftest import transformers

TOKENS = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))


def _logits(cfg, state) -> torch.Tensor:
    model = Transformer(cfg.model, cfg.moe, cfg.router, cfg.fff)
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        return model.eval()(TOKENS).logits_BSV


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture
def dense(hf_dir):
    return load_source(hf_dir("llama")[0])


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_copy_reproduces_the_dense_logits_and_so_does_its_mixtral_export(dense, tmp_path, top_k):
    cfg, state = upcycle(dense.cfg, dense.state, UpcycleSpec("copy", num_experts=4, top_k=top_k))
    reference = _logits(dense.cfg, dense.state)
    assert cfg.model.ffn == "moe" and cfg.moe.num_experts == 4 and cfg.router.renormalize
    assert _rel(_logits(cfg, state), reference) <= 1e-5
    assert write_model(tmp_path / "hf", cfg, state, "hf", overwrite=False) == "MixtralForCausalLM"
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert _rel(exported(TOKENS).logits, reference) <= 1e-5


def test_copy_options_perturb_the_experts(dense):
    reference = _logits(dense.cfg, dense.state)
    for option in ({"noise": 0.05}, {"drop_ratio": 0.5}):
        cfg, state = upcycle(dense.cfg, dense.state, UpcycleSpec("copy", num_experts=4, top_k=2, **option))
        experts = state["blocks.0.ffn.experts.w_gate_up"]
        assert not torch.equal(experts[0], experts[1]), option  # experts no longer identical
        assert _rel(_logits(cfg, state), reference) > 1e-4, option


@pytest.mark.parametrize("partition", ["contiguous", "random", "kmeans"])
def test_split_with_every_expert_active_sums_to_the_dense_ffn(dense, partition):
    reference = _logits(dense.cfg, dense.state)
    errors = []
    for top_k in (1, 2, 4):
        spec = UpcycleSpec("split", num_experts=4, top_k=top_k, partition=partition)
        cfg, state = upcycle(dense.cfg, dense.state, spec)
        assert cfg.moe.expert_hidden == 24 // 4 and cfg.router.combine == "unit"
        errors.append(_rel(_logits(cfg, state), reference))
    assert errors[-1] <= 1e-5, "all 4 experts active with unit weights: exactly the dense FFN"
    assert errors[0] > errors[-1]


@pytest.mark.parametrize(("method", "partition"), [("copy", "contiguous"), ("split", "kmeans"), ("split", "random")])
@pytest.mark.parametrize("top_k", [2, 4])
def test_granular_upcycling_reproduces_the_dense_logits(dense, tmp_path, method, partition, top_k):
    """E = 8 experts: 4 copies of the FFN cut into 2 slices; top-k selects whole copies."""
    spec = UpcycleSpec(method, num_experts=8, top_k=top_k, granularity=2, partition=partition)
    cfg, state = upcycle(dense.cfg, dense.state, spec)
    assert cfg.moe.expert_hidden == 24 // 2 and cfg.router.combine == "weights"
    router = state["blocks.0.ffn.router.weight"]
    assert torch.equal(router[0], router[1]) and not torch.equal(router[1], router[2])  # one row per copy
    reference = _logits(dense.cfg, dense.state)
    assert _rel(_logits(cfg, state), reference) <= 1e-5
    write_model(tmp_path / "hf", cfg, state, "hf", overwrite=False)
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert _rel(exported(TOKENS).logits, reference) <= 1e-5


def test_bad_granularity_names_the_problem(dense):
    for spec, message in [
        (UpcycleSpec("copy", num_experts=8, top_k=3, granularity=2), "--top-k: must be a multiple of --granularity"),
        (UpcycleSpec("split", num_experts=8, top_k=2, granularity=3), "--granularity: must divide --num-experts"),
        (UpcycleSpec("copy", num_experts=10, top_k=5, granularity=5), r"--granularity: must divide the FFN width"),
    ]:
        with pytest.raises(ConfigError, match=message):
            upcycle(dense.cfg, dense.state, spec)


def test_split_layers_only_touch_the_named_blocks(dense):
    cfg, state = upcycle(dense.cfg, dense.state, UpcycleSpec("split", num_experts=2, top_k=2, layers=[1]))
    assert cfg.model.sparse_layers == [1]
    assert torch.equal(state["blocks.0.ffn.w_gate.weight"], dense.state["blocks.0.ffn.w_gate.weight"])
    assert "blocks.1.ffn.w_gate.weight" not in state


def test_balanced_kmeans_partitions_into_equal_groups_and_finds_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 8, generator=g) * 10
    points = torch.cat([c + 0.1 * torch.randn(6, 8, generator=g) for c in centers])  # 4 tight clusters of 6
    groups = balanced_kmeans(points, 4, g)
    assert groups.shape == (4, 6) and sorted(groups.flatten().tolist()) == list(range(24))
    assert sorted(sorted(grp // 6 for grp in group.tolist()) for group in groups) == [[c] * 6 for c in range(4)]


def test_bad_upcycle_requests_name_the_problem(dense):
    with pytest.raises(ConfigError, match=r"--num-experts: must divide the FFN width \(24\), got 5"):
        upcycle(dense.cfg, dense.state, UpcycleSpec("split", num_experts=5, top_k=1))
    with pytest.raises(ConfigError, match="--top-k: must be in"):
        upcycle(dense.cfg, dense.state, UpcycleSpec("copy", num_experts=4, top_k=5))
    with pytest.raises(ConfigError, match=r"--layers: block indices must be in \[0, 2\)"):
        upcycle(dense.cfg, dense.state, UpcycleSpec("copy", num_experts=4, top_k=1, layers=[7]))
    moe_cfg, moe_state = upcycle(dense.cfg, dense.state, UpcycleSpec("copy", num_experts=4, top_k=1))
    with pytest.raises(ConfigError, match="upcycling starts from a dense model"):
        upcycle(moe_cfg, moe_state, UpcycleSpec("copy", num_experts=4, top_k=1))


def test_upcycle_and_convert_commands_write_complete_directories(hf_dir, tmp_path, capsys):
    from sparse_train.cli import main
    from sparse_train.inference import load_trained

    path, hf_model = hf_dir("qwen2")
    with torch.no_grad():
        reference = hf_model(TOKENS).logits
    out = tmp_path / "moe"
    argv = ["upcycle", "--from", str(path), "--to", str(out), "--method", "copy", "--num-experts", "4", "--top-k", "2"]
    assert main(argv) == 0
    assert "top-2 in blocks [0, 1]" in capsys.readouterr().out
    loaded = load_trained(out)  # a native run directory eval/generate/--init-from read
    with torch.no_grad():
        assert _rel(loaded.model(TOKENS).logits_BSV, reference) <= 1e-5
    assert main(argv) == 2 and "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["convert", "--from", str(out), "--to", str(tmp_path / "hf"), "--format", "hf"]) == 0
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(exported).__name__ == "Qwen2MoeForCausalLM"  # Qwen2 base: q/k/v biases
    with torch.no_grad():
        assert _rel(exported(TOKENS).logits, reference) <= 1e-4
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary directory left behind"


def test_upcycle_command_errors_are_one_line(hf_dir, tmp_path, capsys):
    from sparse_train.cli import main

    path, _ = hf_dir("llama")
    capsys.readouterr()  # the fixture's own output
    base = ["upcycle", "--to", str(tmp_path / "x"), "--top-k", "1"]
    cases = [
        (["--from", str(tmp_path / "nothing"), "--method", "copy", "--num-experts", "2"], "no such directory"),
        (["--from", str(path), "--method", "split", "--num-experts", "5"], "must divide the FFN width (24)"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()
