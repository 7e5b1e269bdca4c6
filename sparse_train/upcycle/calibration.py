"""Calibration data for the activation-driven conversions (moefication, cmoe, fff).

The dense model reads a few thousand tokens, and each converted block's FFN input (the
hidden state after its RMSNorm) is recorded. The sequences are split into a fit part, which
the conversions learn neuron groups and routers from, and a held-out part, on which the
conversion report measures how far each converted FFN is from the dense one.

Text comes from the default corpus (the Python standard library, documents in a seeded
random order) or from `--calib PATH` (a text file or directory, .jsonl, or a pre-tokenised
.bin of token ids), tokenised with the checkpoint's own tokenizer: its HF tokenizer when it
has one, the byte tokenizer of a sparse_train run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sparse_train.config import Config, ConfigError
from sparse_train.data.corpus import (
    DataError,
    detect_format,
    read_files,
    read_jsonl,
    stdlib_files,
    stdlib_root,
    text_files,
)
from sparse_train.data.tokenizer import Tokenizer
from sparse_train.models.rope import rotary_tables
from sparse_train.models.transformer import Transformer

HELD_OUT_FRACTION = 0.25


@dataclass
class Calibration:
    """Per converted block: FFN inputs `fit[i]` [N_fit, D] and `held_out[i]` [N_held, D] (fp32)."""

    fit: dict[int, torch.Tensor]
    held_out: dict[int, torch.Tensor]
    source: str
    num_tokens: int


def _documents(path: Path | None, seed: int):
    if path is None:
        files = stdlib_files()
        random.Random(seed).shuffle(files)  # a spread of modules, not the alphabet's first ones
        return read_files(files, stdlib_root()), f"Python standard library ({stdlib_root()})"
    if detect_format(path) == "jsonl":
        return read_jsonl(path, "text"), f"jsonl: {path}"
    return read_files(text_files(path), path if path.is_dir() else path.parent), f"text: {path}"


def calibration_tokens(
    tokenizer: Tokenizer | None, path: Path | None, num_tokens: int, vocab_size: int, seed: int = 0
) -> tuple[np.ndarray, str]:
    """About `num_tokens` token ids (documents separated by the tokenizer's end of text)."""
    if path is not None:
        path = Path(path).expanduser()
        if not path.exists():
            raise ConfigError("--calib", f"no such file or directory: {path}")
        if path.is_file() and path.stat().st_size == 0:
            raise ConfigError("--calib", f"{path} is empty")
    if path is not None and detect_format(path) == "bin":
        tokens = np.fromfile(path, dtype=np.uint16 if vocab_size <= 2**16 else np.uint32)[:num_tokens]
        if tokens.size and int(tokens.max()) >= vocab_size:
            too_big = int(tokens.max())
            raise ConfigError("--calib", f"{path}: token id {too_big} >= the model's vocabulary ({vocab_size})")
        return tokens, f"bin: {path}"
    if tokenizer is None:
        raise ConfigError(
            "--calib",
            "the source has no tokenizer files (tokenizer.json or tokenizer.model) to tokenise calibration text; "
            "add them, or pass token ids as --calib FILE.bin",
        )
    docs, source = _documents(path, seed)
    chunks, total = [], 0
    try:
        for _, text in docs:
            if not text.strip():
                continue
            ids = tokenizer.encode(text)
            chunks += [ids, np.array([tokenizer.eot_id], dtype=ids.dtype)]
            total += ids.size + 1
            if total >= num_tokens:
                break
    except DataError as err:
        raise ConfigError("--calib", str(err)) from None
    if total == 0:
        raise ConfigError("--calib", f"no text in {path}")
    tokens = np.concatenate(chunks)[:num_tokens]
    if int(tokens.max()) >= vocab_size:
        raise ConfigError(
            "--calib", f"the tokenizer makes id {int(tokens.max())} >= the model's vocabulary ({vocab_size})"
        )
    return tokens, source


@torch.no_grad()
def ffn_inputs(
    cfg: Config,
    state: dict[str, torch.Tensor],
    tokens: np.ndarray,
    layers: list[int],
    seq_len: int = 128,
    source: str = "",
) -> Calibration:
    """Run the dense model over `tokens` cut into sequences, recording every block in `layers`'
    FFN input; the last HELD_OUT_FRACTION of the sequences are held out."""
    seq_len = min(seq_len, cfg.model.max_seq_len)
    n_seq = tokens.size // seq_len
    if n_seq < 2:
        raise ConfigError(
            "--calib", f"{tokens.size} calibration tokens hold fewer than 2 sequences of {seq_len}; give more text"
        )
    batch = torch.from_numpy(tokens[: n_seq * seq_len].astype(np.int64)).view(n_seq, seq_len)
    with torch.device("meta"):  # the given weights become the parameters: no second copy, nothing drawn
        model = Transformer(cfg.model, cfg.moe, cfg.router, cfg.fff)
    model.load_state_dict(state, strict=True, assign=True)
    model.rope_cos, model.rope_sin = rotary_tables(cfg.model)
    model.eval()
    captured: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    hooks = [
        model.blocks[i].ffn.register_forward_pre_hook(
            lambda module, args, i=i: captured[i].append(args[0].reshape(-1, args[0].shape[-1]).float())
        )
        for i in layers
    ]
    try:
        for chunk in batch.split(16):
            model(chunk)
    finally:
        for hook in hooks:
            hook.remove()
    n_fit = (n_seq - max(1, round(HELD_OUT_FRACTION * n_seq))) * seq_len
    inputs = {i: torch.cat(parts) for i, parts in captured.items()}
    return Calibration(
        fit={i: x[:n_fit] for i, x in inputs.items()},
        held_out={i: x[n_fit:] for i, x in inputs.items()},
        source=source,
        num_tokens=n_seq * seq_len,
    )
