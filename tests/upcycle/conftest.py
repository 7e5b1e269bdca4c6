"""Tiny random Hugging Face models built locally with transformers (nothing is downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sparse_train.bench.hf_models import KINDS
from sparse_train.bench.hf_models import build_hf as build_tiny_hf

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


ALL_KINDS = list(KINDS)


def build_hf(kind: str, vocab_size: int = 64):
    """A random tiny model of `kind` (ALL_KINDS), weights drawn from seed 0
    (sparse_train.bench.hf_models: the conversion benchmark's models)."""
    return build_tiny_hf(kind, seed=0, vocab_size=vocab_size)


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
