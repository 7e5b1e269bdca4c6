"""Rotary tables with YaRN, MLA's softmax scale and the HF rope mapping, checked against
Hugging Face transformers (DeepSeek-V3 and gpt-oss), whose tables checkpoints were trained with.

HF computes inv_freq in fp32, so the reference tables are cos/sin of positions x HF's inv_freq in
float64: their difference from ours grows with the position (~1e-6 at 64), hence the short tables
next to the relative comparison of inv_freq, which covers every position.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch

from sparse_train.config import ModelConfig, compose_config, load_config
from sparse_train.models.rope import (
    mla_softmax_scale,
    rope_fields_from_hf,
    rope_frequencies,
    rope_parameters_to_hf,
    rotary_tables,
)

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (  # noqa: E402
    DeepseekV3Attention,
    DeepseekV3RotaryEmbedding,
)
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding  # noqa: E402

TABLE_LEN = 32  # fp32 inv_freq in HF: ~5e-7 off at position 31 (see the module docstring)
ROPE_DIM = 16

# The real models' YaRN parameters (config.json), on small models.
DEEPSEEK_YARN = {
    "rope_type": "yarn",
    "factor": 40.0,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
GPT_OSS_YARN = {
    "rope_type": "yarn",
    "factor": 32.0,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
}
DEEPSEEK_OURS = [
    "model.rope_scaling.kind=yarn",
    "model.rope_scaling.factor=40",
    "model.rope_scaling.original_max_seq_len=4096",
    "model.rope_scaling.beta_fast=32",
    "model.rope_scaling.beta_slow=1",
    "model.rope_scaling.mscale=1",
    "model.rope_scaling.mscale_all_dim=1",
]
GPT_OSS_OURS = [
    "model.rope_scaling.kind=yarn",
    "model.rope_scaling.factor=32",
    "model.rope_scaling.original_max_seq_len=4096",
    "model.rope_scaling.beta_fast=32",
    "model.rope_scaling.beta_slow=1",
    "model.rope_scaling.truncate=false",
]


def _ours(arch: str, theta: float, *overrides: str) -> ModelConfig:
    shape = (
        [
            "model.attention.kind=mla",
            f"model.attention.qk_rope_head_dim={ROPE_DIM}",
            "model.attention.qk_nope_head_dim=32",
        ]
        if arch == "deepseek"
        else ["model.d_model=64", "model.n_heads=4", f"model.attention.head_dim={ROPE_DIM}"]
    )
    return load_config(None, [*shape, f"model.rope_theta={theta}", *overrides]).model


def _hf_config(arch: str, rope_parameters: dict[str, Any], theta: float, **extra: Any) -> Any:
    """A small DeepseekV3Config / GptOssConfig (rotated width ROPE_DIM) with these rope parameters."""
    params = {"rope_theta": theta, **copy.deepcopy(rope_parameters)}  # HF fills the dict in place
    if arch == "deepseek":
        extra.setdefault("max_position_embeddings", 163840)
        return transformers.DeepseekV3Config(
            hidden_size=64,
            num_attention_heads=4,
            num_hidden_layers=1,
            q_lora_rank=None,
            kv_lora_rank=32,
            qk_rope_head_dim=ROPE_DIM,
            qk_nope_head_dim=32,
            v_head_dim=32,
            rope_parameters=params,
            **extra,
        )
    extra.setdefault("max_position_embeddings", 131072)
    return transformers.GptOssConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=ROPE_DIM, rope_parameters=params, **extra
    )


def _hf_frequencies(config: Any) -> tuple[torch.Tensor, float]:
    """inv_freq and the cos/sin scale of HF's rotary embedding module (default rope included),
    which for YaRN must be ROPE_INIT_FUNCTIONS["yarn"]'s."""
    module = (DeepseekV3RotaryEmbedding if config.model_type == "deepseek_v3" else GptOssRotaryEmbedding)(config)
    inv_freq, scale = module.inv_freq, float(module.attention_scaling)
    if config.rope_parameters["rope_type"] == "yarn":
        init_inv_freq, init_scale = ROPE_INIT_FUNCTIONS["yarn"](config)
        assert torch.equal(init_inv_freq, inv_freq) and init_scale == scale
    return inv_freq.double(), scale


def _assert_same_rope(m: ModelConfig, config: Any) -> None:
    hf_inv_freq, hf_scale = _hf_frequencies(config)
    inv_freq, scale = rope_frequencies(m)
    assert inv_freq.dtype == torch.float64 and inv_freq.shape == (ROPE_DIM // 2,)
    torch.testing.assert_close(inv_freq, hf_inv_freq, rtol=1e-6, atol=0)
    assert scale == pytest.approx(hf_scale, rel=1e-12)
    angles = torch.outer(torch.arange(TABLE_LEN, dtype=torch.float64), hf_inv_freq).repeat(1, 2)
    cos, sin = rotary_tables(m, TABLE_LEN)
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == sin.shape == (TABLE_LEN, ROPE_DIM)
    torch.testing.assert_close(cos, (angles.cos() * hf_scale).float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, (angles.sin() * hf_scale).float(), rtol=0, atol=1e-6)


# (arch, theta, our overrides, HF rope_parameters): the two models' default and YaRN ropes, then
# YaRN corners: DeepSeek-V2's mscale ratio, a given attention factor, a correction range whose high
# end passes the last frequency index (HF clamps it to Dh - 1, not Dh/2 - 1), an empty range.
CASES = {
    "deepseek-default": ("deepseek", 10000.0, [], {"rope_type": "default"}),
    "deepseek-yarn": ("deepseek", 10000.0, DEEPSEEK_OURS, DEEPSEEK_YARN),
    "gpt-oss-default": ("gpt-oss", 150000.0, [], {"rope_type": "default"}),
    "gpt-oss-yarn": ("gpt-oss", 150000.0, GPT_OSS_OURS, GPT_OSS_YARN),
    "deepseek-mscale-ratio": (
        "deepseek",
        10000.0,
        [*DEEPSEEK_OURS, "model.rope_scaling.mscale=0.707", "model.rope_scaling.mscale_all_dim=1.3"],
        {**DEEPSEEK_YARN, "mscale": 0.707, "mscale_all_dim": 1.3},
    ),
    "gpt-oss-attention-factor": (
        "gpt-oss",
        150000.0,
        [*GPT_OSS_OURS, "model.rope_scaling.attention_factor=0.9"],
        {**GPT_OSS_YARN, "attention_factor": 0.9},
    ),
    "gpt-oss-high-past-last-index": ("gpt-oss", 500.0, GPT_OSS_OURS, GPT_OSS_YARN),
    "deepseek-empty-range": (
        "deepseek",
        10000.0,
        [*DEEPSEEK_OURS, "model.rope_scaling.original_max_seq_len=4"],
        {**DEEPSEEK_YARN, "original_max_position_embeddings": 4},
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_tables_equal_transformers(case: str) -> None:
    arch, theta, overrides, rope_parameters = CASES[case]
    _assert_same_rope(_ours(arch, theta, *overrides), _hf_config(arch, rope_parameters, theta))


def test_yarn_changes_the_tables_and_the_corners_are_reached() -> None:
    """Guards the comparisons above against vacuity: YaRN moves some frequencies and not others,
    gpt-oss scales cos/sin, and the corner cases do put the range where their names say."""
    base, _ = rope_frequencies(_ours("gpt-oss", 150000.0))
    yarn, scale = rope_frequencies(_ours("gpt-oss", 150000.0, *GPT_OSS_OURS))
    assert yarn[0].item() == base[0].item() and yarn[-1].item() == pytest.approx(base[-1].item() / 32, rel=1e-12)
    assert scale == pytest.approx(0.1 * math.log(32) + 1)
    cos, _ = rotary_tables(_ours("gpt-oss", 150000.0, *GPT_OSS_OURS))
    assert cos.shape == (256, ROPE_DIM) and cos[0, 0].item() == pytest.approx(scale)  # model.max_seq_len rows
    high = ROPE_DIM * math.log(4096 / (2 * math.pi)) / (2 * math.log(500.0))
    assert ROPE_DIM // 2 - 1 < high < ROPE_DIM - 1


@pytest.mark.parametrize("case", ["deepseek-default", "deepseek-yarn", "deepseek-mscale-ratio"])
def test_mla_softmax_scale_equals_deepseek_v3_attention(case: str) -> None:
    arch, theta, overrides, rope_parameters = CASES[case]
    m = _ours(arch, theta, *overrides)
    hf_scale = DeepseekV3Attention(_hf_config(arch, rope_parameters, theta), layer_idx=0).scaling
    assert mla_softmax_scale(m) == pytest.approx(hf_scale, rel=1e-12)
    if case != "deepseek-default":
        assert mla_softmax_scale(m) > 1.5 * 48**-0.5  # the mscale_all_dim correction is applied


def test_mla_softmax_scale_refuses_gqa() -> None:
    with pytest.raises(ValueError, match="multi-head latent"):
        mla_softmax_scale(_ours("gpt-oss", 150000.0))


# config.json rope entries as the real checkpoints ship them (transformers 4 format) and as
# transformers 5 writes them, with the fields they mean.
DEEPSEEK_V3_JSON = {
    "max_position_embeddings": 163840,
    "rope_theta": 10000,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
}
GPT_OSS_JSON = {
    "max_position_embeddings": 131072,
    "rope_theta": 150000,
    "rope_scaling": {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "rope_type": "yarn",
        "truncate": False,
    },
}
V5_JSON = {"max_position_embeddings": 131072, "rope_parameters": {**GPT_OSS_YARN, "rope_theta": 150000.0}}


def _yarn_fields(**fields: Any) -> dict[str, Any]:
    base = {"kind": "yarn", "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": None, "truncate": True}
    return {**base, "mscale": None, "mscale_all_dim": None, **fields}


@pytest.mark.parametrize(
    ("hf_json", "theta", "scaling"),
    [
        (
            DEEPSEEK_V3_JSON,
            10000.0,
            _yarn_fields(factor=40.0, original_max_seq_len=4096, mscale=1.0, mscale_all_dim=1.0),
        ),
        (GPT_OSS_JSON, 150000.0, _yarn_fields(factor=32.0, original_max_seq_len=4096, truncate=False)),
        (V5_JSON, 150000.0, _yarn_fields(factor=32.0, original_max_seq_len=4096, truncate=False)),
        ({"rope_theta": 500000.0, "rope_scaling": None}, 500000.0, None),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}, 1e6, None),
        ({}, 10000.0, None),
    ],
)
def test_rope_fields_from_hf_config_json(hf_json: dict[str, Any], theta: float, scaling: dict | None) -> None:
    fields = rope_fields_from_hf(copy.deepcopy(hf_json))
    expected = scaling or ModelConfig().rope_scaling.to_dict()
    assert fields == {"rope_theta": theta, "rope_scaling": expected}
    assert compose_config({"model": fields}).model.rope_scaling.to_dict() == expected  # loadable as is


# How HF fills in what a yarn config leaves out: a null factor is max_position_embeddings /
# original_max_position_embeddings, a missing original is max_position_embeddings, and a
# top-level original_max_position_embeddings (Phi-3 style) overrides the one in rope_parameters.
INFERRED = {
    "null-factor": ({"factor": None, "original_max_position_embeddings": 4096}, {"max_position_embeddings": 65536}),
    "no-original": ({"factor": 4.0}, {"max_position_embeddings": 2048}),
    "top-level-original": (
        {"factor": 8.0, "original_max_position_embeddings": 4096},
        {"max_position_embeddings": 32768, "original_max_position_embeddings": 1024},
    ),
}


@pytest.mark.parametrize("case", INFERRED)
def test_rope_fields_from_hf_infer_as_transformers_does(case: str) -> None:
    partial, top_level = INFERRED[case]
    rope_parameters = {"rope_type": "yarn", "beta_fast": 32, "beta_slow": 1, **partial}
    fields = rope_fields_from_hf({"rope_parameters": {**rope_parameters, "rope_theta": 10000.0}, **top_level})
    expected_factor = {"null-factor": 16.0, "no-original": 4.0, "top-level-original": 8.0}[case]
    expected_original = {"null-factor": 4096, "no-original": 2048, "top-level-original": 1024}[case]
    assert (fields["rope_scaling"]["factor"], fields["rope_scaling"]["original_max_seq_len"]) == (
        expected_factor,
        expected_original,
    )
    m = compose_config({"model": {**_ours("deepseek", 10000.0).to_dict(), **fields}}).model
    _assert_same_rope(m, _hf_config("deepseek", rope_parameters, 10000.0, **top_level))


@pytest.mark.parametrize("case", ["deepseek-default", "deepseek-yarn", "gpt-oss-yarn", "deepseek-mscale-ratio"])
def test_rope_parameters_to_hf_round_trips_and_builds_our_tables(case: str) -> None:
    arch, theta, overrides, _ = CASES[case]
    m = _ours(arch, theta, *overrides)
    params = rope_parameters_to_hf(m)
    fields = rope_fields_from_hf({"rope_parameters": params})
    assert fields["rope_theta"] == m.rope_theta
    assert fields["rope_scaling"] == m.rope_scaling.to_dict()
    hf = _hf_config(arch, params, params["rope_theta"])
    _assert_same_rope(m, hf)
    if arch == "deepseek":
        assert mla_softmax_scale(m) == pytest.approx(DeepseekV3Attention(hf, layer_idx=0).scaling, rel=1e-12)


@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "longrope", "llama3"])
@pytest.mark.parametrize("key", ["rope_parameters", "rope_scaling"])
def test_unsupported_rope_type_is_a_one_line_error(rope_type: str, key: str) -> None:
    type_key = "type" if key == "rope_scaling" else "rope_type"
    with pytest.raises(ValueError) as info:
        rope_fields_from_hf({key: {type_key: rope_type, "factor": 8.0}, "rope_theta": 10000.0})
    message = str(info.value)
    assert f"'{rope_type}'" in message and "\n" not in message
