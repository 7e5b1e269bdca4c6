"""`train --init-from`: a run that starts from another model's weights (HF directory, upcycled
model or trained run). The model sections of its config come from the source; everything else
from the recipe, then the overrides."""

from __future__ import annotations

from pathlib import Path

from sparse_train.config import Config, compose_config, load_config
from sparse_train.train.weights import WeightSource
from sparse_train.upcycle.io import load_source

MODEL_SECTIONS = ("model", "moe", "router", "fff")


def init_from(source_path: Path, config_path: str | None, overrides: list[str]) -> tuple[Config, WeightSource]:
    """The run's config (model sections from the source, the rest from the recipe, overrides last)
    and the source's weights, by reference (each rank reads only its parts)."""
    source = load_source(Path(source_path))
    data = load_config(config_path).to_dict()
    data.update({section: source.cfg.to_dict()[section] for section in MODEL_SECTIONS})
    data["data"]["seq_len"] = min(data["data"]["seq_len"], source.cfg.model.max_seq_len)
    if source.tokenizer_dir is not None:  # the checkpoint's own tokenizer reads the training data
        data["data"].update(tokenizer="hf", tokenizer_path=str(source.tokenizer_dir))
    return compose_config(data, overrides), source.weights
