"""Tiny random Hugging Face models built locally with transformers (nothing is downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

COMMON = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


# DeepSeek-V3 in small: MLA with both latents, 2 groups of 2 routed experts (a token's 2 experts
# from its best group), one shared expert, the first block dense, the real rotary layout and YaRN.
DEEPSEEK_V3 = dict(
    COMMON,
    num_hidden_layers=3,
    num_key_value_heads=4,
    moe_intermediate_size=12,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    n_shared_experts=1,
    first_k_dense_replace=1,
    q_lora_rank=16,
    kv_lora_rank=8,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    routed_scaling_factor=2.5,
    rope_parameters=dict(
        rope_type="yarn",
        rope_theta=10000.0,
        factor=4.0,
        original_max_position_embeddings=16,
        beta_fast=32.0,
        beta_slow=1.0,
        mscale=1.0,
        mscale_all_dim=1.0,
    ),  # fmt: skip
)
GPT_OSS_ROPE = dict(
    rope_type="yarn", rope_theta=150000.0, factor=4.0, original_max_position_embeddings=16,
    beta_fast=32.0, beta_slow=1.0, truncate=False,
)  # fmt: skip
ALL_KINDS = ["llama", "mistral", "qwen2", "mixtral", "qwen2moe", "qwen3", "qwen3moe", "olmoe", "deepseek_v3", "gpt_oss"]


def build_hf(kind: str, vocab_size: int = 64):
    """A random tiny model of `kind` (ALL_KINDS), weights drawn from seed 0."""
    torch.manual_seed(0)
    common = {**COMMON, "vocab_size": vocab_size}
    t = transformers
    model = {
        "llama": lambda: t.LlamaForCausalLM(t.LlamaConfig(**common)),
        "mistral": lambda: t.MistralForCausalLM(t.MistralConfig(**common, sliding_window=None)),
        "qwen2": lambda: t.Qwen2ForCausalLM(t.Qwen2Config(**common, tie_word_embeddings=True)),
        "mixtral": lambda: t.MixtralForCausalLM(t.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)),
        "qwen2moe": lambda: t.Qwen2MoeForCausalLM(
            t.Qwen2MoeConfig(
                **common,
                moe_intermediate_size=12,
                shared_expert_intermediate_size=16,
                num_experts=4,
                num_experts_per_tok=2,
                mlp_only_layers=[0],
            )
        ),
        "qwen3": lambda: t.Qwen3ForCausalLM(t.Qwen3Config(**common, head_dim=16)),
        "qwen3moe": lambda: t.Qwen3MoeForCausalLM(
            t.Qwen3MoeConfig(
                **common,
                head_dim=16,
                moe_intermediate_size=12,
                num_experts=4,
                num_experts_per_tok=2,
                norm_topk_prob=True,
                mlp_only_layers=[0],
            )  # fmt: skip
        ),
        "olmoe": lambda: t.OlmoeForCausalLM(t.OlmoeConfig(**common, num_experts=4, num_experts_per_tok=2)),
        "deepseek_v3": lambda: t.DeepseekV3ForCausalLM(t.DeepseekV3Config(**{**DEEPSEEK_V3, "vocab_size": vocab_size})),
        "gpt_oss": lambda: t.GptOssForCausalLM(
            t.GptOssConfig(
                **{**common, "num_hidden_layers": 3},
                num_local_experts=4,
                num_experts_per_tok=2,
                head_dim=8,
                sliding_window=4,
                rope_parameters=GPT_OSS_ROPE,
            )  # fmt: skip
        ),
    }[kind]()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3's selection bias: a trained buffer
                b.normal_(0, 0.2)
    return model.eval()


@pytest.fixture
def hf_dir(tmp_path_factory):
    """hf_dir(kind) -> (a saved tiny HF model directory, the model)."""

    def make(kind: str) -> tuple[Path, object]:
        model = build_hf(kind)
        path = tmp_path_factory.mktemp(kind) / "hf"
        model.save_pretrained(path)
        return path, model

    return make


def save_tiny_tokenizer(path: Path, vocab_size: int = 64) -> None:
    """A BPE tokenizer of at most `vocab_size` ids (so any id fits the tiny models), trained here
    on a few lines of text and saved as tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    text = ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int = 0\n", "import os, sys\n"] * 20
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "</s>"], limit_alphabet=40)
    tok.train_from_iterator(text, trainer)
    wrapped = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")
    wrapped.save_pretrained(str(path))


def save_deepseek_v3_with_mtp(source: Path, target: Path) -> None:
    """An HF DeepSeek-V3 directory with one multi-token prediction module (layer n_layers, as
    DeepSeek's checkpoints hold it): the model at `source` plus a module drawn from seed 1,
    written by our exporter (transformers neither builds nor saves MTP modules)."""
    from sparse_train.config import compose_config
    from sparse_train.lazy import read_all
    from sparse_train.models.transformer import Transformer
    from sparse_train.upcycle.hf import native_config, read_hf, to_native, write_hf

    ckpt = read_hf(source)
    cfg = native_config(ckpt)
    data = cfg.to_dict()
    cfg = compose_config({**data, "model": {**data["model"], "mtp_depth": 1}})
    model = Transformer(cfg.model, cfg.moe, cfg.router, cfg.fff)
    model.reset_parameters(seed=1)
    missing, _ = model.load_state_dict(read_all(to_native(ckpt, native_config(ckpt))), strict=False)
    assert missing and all(name.startswith("mtp.") for name in missing)
    write_hf(target, model.state_dict(), cfg)
