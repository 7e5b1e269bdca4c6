"""HF import/export: logits equal to transformers', exact tensor round trips, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from sparse_train.config import ConfigError
from sparse_train.lazy import read_all
from sparse_train.models.transformer import Transformer
from sparse_train.upcycle.hf import native_config, read_hf, to_native, write_hf
from tests.upcycle.conftest import ALL_KINDS, transformers

KINDS = ALL_KINDS


def _native(path):
    ckpt = read_hf(path)
    cfg = native_config(ckpt)
    model = Transformer(cfg.model, cfg.moe, cfg.router, cfg.fff)
    model.load_state_dict(read_all(to_native(ckpt, cfg)), strict=True)
    return ckpt, cfg, model.eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("kind", KINDS)
def test_import_matches_transformers_and_export_round_trips_every_tensor(kind, hf_dir, tmp_path):
    path, hf_model = hf_dir(kind)
    ckpt, cfg, model = _native(path)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = hf_model(tokens).logits
        assert _rel(model(tokens).logits_BSV, reference) <= 1e-5
    arch = write_hf(tmp_path / "out", model.state_dict(), cfg)
    again = read_hf(tmp_path / "out")
    assert set(again.tensors) == set(ckpt.tensors)
    for name, tensor in ckpt.tensors.items():
        assert torch.equal(again.tensors[name].full(), tensor.full()), name
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded).__name__ == arch
    with torch.no_grad():
        assert _rel(reloaded(tokens).logits, reference) <= 1e-4


def test_qwen2_moe_shared_expert_gate_and_dense_blocks_are_imported(hf_dir):
    _, cfg, model = _native(hf_dir("qwen2moe")[0])
    assert cfg.model.sparse_layers == [1] and cfg.moe.shared_expert_gate and cfg.model.qkv_bias
    assert model.blocks[1].ffn.shared_gate is not None


def test_sharded_checkpoints_are_read_through_their_index(hf_dir, tmp_path):
    path, hf_model = hf_dir("llama")
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert read_hf(tmp_path / "sharded").tensors.keys() == read_hf(path).tensors.keys()


def test_bad_directories_get_one_line_errors(hf_dir, tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        read_hf(tmp_path)
    path, _ = hf_dir("llama")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConfigError, match=r"GPT2LMHeadModel.*not supported; supported: LlamaForCausalLM"):
        read_hf(path)
    (path / "config.json").write_text(json.dumps(config))
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ConfigError, match="model.safetensors is corrupt or truncated"):
        read_hf(path)
    weights.unlink()
    with pytest.raises(ConfigError, match="no model.safetensors"):
        read_hf(path)


def test_unsupported_model_options_are_refused_by_name(hf_dir):
    path, _ = hf_dir("llama")
    config = json.loads((path / "config.json").read_text())
    llama3 = {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}}
    for change, message in (
        ({"hidden_act": "gelu"}, "LlamaForCausalLM: hidden_act='gelu' is not supported"),
        (llama3, "rope type 'llama3' is not supported"),
        ({"clip_qkv": 8.0}, "LlamaForCausalLM: config field 'clip_qkv' is not understood by the importer"),
        ({"quantization_config": {"quant_method": "fp8"}}, "config field 'quantization_config' is not understood"),
        ({"pretraining_tp": 2}, "pretraining_tp=2 is not supported"),
    ):
        (path / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ConfigError, match=message):
            native_config(read_hf(path))


@pytest.mark.parametrize(
    ("kind", "change", "message"),
    [
        ("deepseek_v3", {"scoring_func": "softmax"}, "DeepseekV3ForCausalLM: scoring_func='softmax' is not supported"),
        ("deepseek_v3", {"topk_group": 2}, "num_experts_per_tok=2 with topk_group=2 is not supported"),
        ("deepseek_v3", {"moe_layer_freq": 2}, "moe_layer_freq=2"),
        ("olmoe", {"clip_qkv": 8.0}, "OlmoeForCausalLM: clip_qkv=8.0 is not supported"),
        ("qwen3", {"use_sliding_window": True}, "Qwen3ForCausalLM: use_sliding_window=True is not supported"),
        ("gpt_oss", {"layer_types": ["chunked_attention"] * 3}, "layer type 'chunked_attention' is not supported"),
    ],
)
def test_architecture_options_the_model_cannot_reproduce_are_refused(kind, change, message, hf_dir):
    path, _ = hf_dir(kind)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ConfigError, match=message):
        native_config(read_hf(path))


@pytest.mark.parametrize("kind", KINDS)
def test_every_field_transformers_writes_is_understood_or_known_not_to_matter(kind):
    from sparse_train.upcycle.hf_config import CONFIG_CLASSES, IGNORED, UNDERSTOOD
    from tests.upcycle.conftest import build_hf

    arch = type(build_hf(kind)).__name__
    written = set(getattr(transformers, CONFIG_CLASSES[arch])().to_dict())
    assert written - UNDERSTOOD[arch] - IGNORED == set()


def test_missing_extra_and_misshapen_tensors_are_named(hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    path, _ = hf_dir("deepseek_v3")
    weights = load_file(path / "model.safetensors")
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    for change, message in (
        ({k: v for k, v in weights.items() if k != bias}, f"tensor {bias} is missing"),
        (
            {**weights, "model.layers.1.mlp.gate.extra": torch.zeros(2)},
            "no place for, e.g. model.layers.1.mlp.gate.extra",
        ),
        (
            {**weights, "model.layers.2.self_attn.kv_b_proj.weight": torch.zeros(8, 8)},
            r"blocks.2.attn.kv_up.weight has shape \[8, 8\] but DeepseekV3ForCausalLM's config.json makes it "
            r"\[64, 8\] \(read from model.layers.2.self_attn.kv_b_proj.weight\)",
        ),
    ):
        save_file(change, path / "model.safetensors", metadata={"format": "pt"})
        ckpt = read_hf(path)
        with pytest.raises(ConfigError, match=message):
            to_native(ckpt, native_config(ckpt))


def test_ungated_shared_experts_export_exactly_as_qwen2_moe(tmp_path):
    from tests.conftest import tiny_config

    cfg = tiny_config("moe.num_shared_experts=1", "model.vocab_size=258")
    model = Transformer(cfg.model, cfg.moe, cfg.router, cfg.fff).eval()
    assert write_hf(tmp_path / "out", model.state_dict(), cfg) == "Qwen2MoeForCausalLM"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert _rel(theirs(tokens).logits, model(tokens).logits_BSV) <= 1e-5
    gate = read_hf(tmp_path / "out").tensors["model.layers.0.mlp.shared_expert_gate.weight"].full()
    assert not gate.any(), "a zero gate: sigmoid(0) = 1/2 against the doubled down projection"


def test_unit_combine_is_not_exported_inexactly(tmp_path):
    from tests.conftest import tiny_config

    cfg = tiny_config("router.combine=unit", "model.vocab_size=258")
    with pytest.raises(ConfigError, match="export needs combine: weights"):
        write_hf(tmp_path / "out", Transformer(cfg.model, cfg.moe, cfg.router, cfg.fff).state_dict(), cfg)
    assert not (tmp_path / "out").exists()


def test_a_trained_sparse_train_moe_run_exports_to_mixtral(tmp_path):
    from sparse_train.cli import main
    from sparse_train.inference import load_trained
    from sparse_train.train.trainer import Trainer
    from tests.conftest import tiny_config

    Trainer(tiny_config("train.steps=3"), tmp_path / "run").fit()
    assert main(["convert", "--from", str(tmp_path / "run"), "--to", str(tmp_path / "hf"), "--format", "hf"]) == 0
    ours = load_trained(tmp_path / "run").model
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs).__name__ == "MixtralForCausalLM"
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert _rel(theirs(tokens).logits, ours(tokens).logits_BSV) <= 1e-4


def test_deepseek_v3_multi_token_prediction_modules_round_trip(hf_dir, tmp_path):
    from tests.upcycle.conftest import save_deepseek_v3_with_mtp

    path, hf_model = hf_dir("deepseek_v3")
    save_deepseek_v3_with_mtp(path, tmp_path / "mtp")
    ckpt, cfg, model = _native(tmp_path / "mtp")
    assert cfg.model.mtp_depth == 1 and "model.layers.3.eh_proj.weight" in ckpt.tensors
    assert ckpt.tensors["model.layers.3.mlp.gate.e_score_correction_bias"].shape == (4,)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        output = model(tokens)
        assert _rel(output.logits_BSV, hf_model(tokens).logits) <= 1e-4  # MTP does not change the logits
        assert [tuple(t.shape) for t in output.mtp_logits] == [(2, 15, 64)]
    write_hf(tmp_path / "again", model.state_dict(), cfg)
    again = read_hf(tmp_path / "again")
    assert set(again.tensors) == set(ckpt.tensors)
    for name, tensor in ckpt.tensors.items():
        assert torch.equal(again.tensors[name].full(), tensor.full()), name
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        assert _rel(reloaded(tokens).logits, hf_model(tokens).logits) <= 1e-4


@pytest.mark.parametrize("kind", ["deepseek_v3", "gpt_oss", "olmoe"])
def test_convert_to_a_native_run_and_back_reproduces_every_tensor(kind, hf_dir, tmp_path):
    from sparse_train.cli import main
    from tests.upcycle.conftest import save_deepseek_v3_with_mtp

    path, _ = hf_dir(kind)
    if kind == "deepseek_v3":
        save_deepseek_v3_with_mtp(path, tmp_path / "source")
        path = tmp_path / "source"
    for source, target, fmt in ((path, tmp_path / "native", "native"), (tmp_path / "native", tmp_path / "hf", "hf")):
        assert main(["convert", "--from", str(source), "--to", str(target), "--format", fmt]) == 0
    before, after = read_hf(path), read_hf(tmp_path / "hf")
    assert set(after.tensors) == set(before.tensors)
    for name, tensor in before.tensors.items():
        assert torch.equal(after.tensors[name].full(), tensor.full()), name
