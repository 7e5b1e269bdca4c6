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


def build_hf(kind: str):
    torch.manual_seed(0)
    t = transformers
    model = {
        "llama": lambda: t.LlamaForCausalLM(t.LlamaConfig(**COMMON)),
        "mistral": lambda: t.MistralForCausalLM(t.MistralConfig(**COMMON, sliding_window=None)),
        "qwen2": lambda: t.Qwen2ForCausalLM(t.Qwen2Config(**COMMON, tie_word_embeddings=True)),
        "mixtral": lambda: t.MixtralForCausalLM(t.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2)),
        "qwen2moe": lambda: t.Qwen2MoeForCausalLM(
            t.Qwen2MoeConfig(
                **COMMON,
                moe_intermediate_size=12,
                shared_expert_intermediate_size=16,
                num_experts=4,
                num_experts_per_tok=2,
                mlp_only_layers=[0],
            )
        ),
    }[kind]()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
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
