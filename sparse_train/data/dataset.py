"""Token streams and the deterministic, resumable batch sampler.

The corpus becomes two 1-D token streams (train, validation), documents separated by the
tokenizer's end-of-text id. The sampler cuts a stream into non-overlapping windows of
seq_len + 1 tokens and visits them in a fresh permutation each epoch, seeded by (seed, epoch).
Its whole state is one integer, the number of samples consumed, which checkpoints store.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sparse_train.config import ConfigError, DataConfig
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

_SPLIT_BUCKETS = 10_000


@dataclass
class TokenData:
    train: np.ndarray
    val: np.ndarray
    source: str

    @property
    def num_tokens(self) -> int:
        return int(self.train.size + self.val.size)


def _is_validation(doc_id: str, val_fraction: float) -> bool:
    return zlib.crc32(doc_id.encode()) % _SPLIT_BUCKETS < val_fraction * _SPLIT_BUCKETS


def _stream(chunks: list[np.ndarray], eot_id: int) -> np.ndarray:
    if not chunks:
        return np.zeros(0, dtype=np.uint16)
    sep = np.array([eot_id], dtype=chunks[0].dtype)
    return np.concatenate([part for chunk in chunks for part in (chunk, sep)])


def _split_documents(
    docs: Iterable[tuple[str, str]], tokenizer: Tokenizer, cfg: DataConfig
) -> tuple[np.ndarray, np.ndarray]:
    train, val = [], []
    for doc_id, text in docs:
        (val if _is_validation(doc_id, cfg.val_fraction) else train).append(tokenizer.encode(text))
    need = cfg.seq_len + 1
    train_stream, val_stream = _stream(train, tokenizer.eot_id), _stream(val, tokenizer.eot_id)
    if train_stream.size < need or val_stream.size < need:
        # Too few documents for a per-document split: hold out the tail of the stream instead.
        everything = _stream(train + val, tokenizer.eot_id)
        cut = int(everything.size * (1 - cfg.val_fraction))
        train_stream, val_stream = everything[:cut], everything[cut:]
    return train_stream, val_stream


def load_token_data(cfg: DataConfig, tokenizer: Tokenizer, vocab_size: int) -> TokenData:
    """Read and tokenise the configured corpus; raise DataError naming any problem."""
    if cfg.path is None:
        root = stdlib_root()
        train, val = _split_documents(read_files(stdlib_files(), root), tokenizer, cfg)
        source = f"Python standard library sources ({root})"
    else:
        path = Path(cfg.path).expanduser()
        if not path.exists():
            raise ConfigError("data.path", f"no such file or directory: {cfg.path}")
        fmt = detect_format(path) if cfg.format == "auto" else cfg.format
        if fmt == "bin":
            train, val = _load_bin(path, cfg, vocab_size)
        elif fmt == "jsonl":
            train, val = _split_documents(read_jsonl(path, cfg.text_field), tokenizer, cfg)
        else:
            files = text_files(path)
            train, val = _split_documents(read_files(files, path if path.is_dir() else path.parent), tokenizer, cfg)
        source = f"{fmt}: {path}"
    need = cfg.seq_len + 1
    if train.size < need or val.size < need:
        raise DataError(
            f"corpus too small: {train.size} train / {val.size} validation tokens, "
            f"each split needs at least data.seq_len + 1 = {need}"
        )
    return TokenData(train, val, source)


def _load_bin(path: Path, cfg: DataConfig, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    dtype = np.dtype(cfg.bin_dtype)
    if path.stat().st_size % dtype.itemsize:
        raise DataError(
            f"{path}: size {path.stat().st_size} is not a multiple of {cfg.bin_dtype} ({dtype.itemsize} bytes)"
        )
    tokens = np.memmap(path, dtype=dtype, mode="r")
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise DataError(f"{path}: token id {int(tokens.max())} >= model.vocab_size ({vocab_size})")
    cut = int(tokens.size * (1 - cfg.val_fraction))
    return tokens[:cut], tokens[cut:]


def _windows(tokens: np.ndarray, seq_len: int, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    batch = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
    return batch[:, :-1], batch[:, 1:]


class BatchSampler:
    """Shuffled non-overlapping windows, one permutation per epoch; state = samples consumed."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, consumed: int = 0) -> None:
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.num_windows = (tokens.size - 1) // seq_len
        if self.num_windows < 1:
            raise DataError(f"stream of {tokens.size} tokens holds no window of {seq_len + 1}")
        self.consumed = consumed
        self._epoch, self._perm = -1, np.zeros(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
        return self._perm

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs [B, S], targets [B, S]) int64; targets are inputs shifted by one."""
        samples = np.arange(self.consumed, self.consumed + self.batch_size)
        epochs, positions = np.divmod(samples, self.num_windows)
        windows = np.array([self._permutation(int(e))[p] for e, p in zip(epochs, positions, strict=True)])
        self.consumed += self.batch_size
        return _windows(self.tokens, self.seq_len, windows * self.seq_len)

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consumed = int(state["consumed"])


def validation_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, num_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same fixed windows every time (in order, wrapping), so validation losses compare."""
    num_windows = (tokens.size - 1) // seq_len
    starts = (np.arange(num_batches * batch_size) % num_windows) * seq_len
    return [_windows(tokens, seq_len, chunk) for chunk in np.split(starts, num_batches)]
