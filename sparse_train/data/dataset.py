"""Token streams and the deterministic, resumable batch sampler.

The corpus becomes two 1-D token streams (train, validation), documents separated by the
tokenizer's end-of-text id. The sampler cuts a stream into non-overlapping windows of
seq_len + 1 tokens and visits them in a fresh permutation each epoch, seeded by (seed, epoch).
Its whole state is one integer, the number of samples consumed, which checkpoints store.

A mixture (data.mixture) gives one pair of streams per source; MixtureSampler draws each
sequence's source from the seed (docs/data.md, "Mixtures").
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sparse_train.config import ConfigError, DataConfig
from sparse_train.data import domains
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
class SourceTokens:
    """One source of a mixture: its name and weight (data.mixture) and its own streams."""

    name: str
    weight: float
    train: np.ndarray
    val: np.ndarray
    source: str


@dataclass
class TokenData:
    """The train and validation streams. With a mixture, `sources` holds each source's streams
    and `train` / `val` are their concatenations (for callers that want one stream)."""

    train: np.ndarray
    val: np.ndarray
    source: str
    sources: tuple[SourceTokens, ...] = ()

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
    if cfg.mixture:
        return _load_mixture(cfg, tokenizer, vocab_size)
    if cfg.path is None:
        root = stdlib_root()
        train, val = _split_documents(read_files(stdlib_files(), root), tokenizer, cfg)
        source = f"Python standard library sources ({root})"
    else:
        train, val, source = _read_path(cfg.path, "data.path", cfg, tokenizer, vocab_size)
    _check_size(train, val, cfg.seq_len, "corpus")
    return TokenData(train, val, source)


def _read_path(
    raw: str, field: str, cfg: DataConfig, tokenizer: Tokenizer, vocab_size: int
) -> tuple[np.ndarray, np.ndarray, str]:
    """(train, val, description) of a path as data.path accepts; `field` names it in errors."""
    path = Path(raw).expanduser()
    if not path.exists():
        raise ConfigError(field, f"no such file or directory: {raw}")
    fmt = detect_format(path) if cfg.format == "auto" else cfg.format
    if fmt == "bin":
        train, val = _load_bin(path, cfg, vocab_size)
    elif fmt == "jsonl":
        train, val = _split_documents(read_jsonl(path, cfg.text_field), tokenizer, cfg)
    else:
        files = text_files(path)
        train, val = _split_documents(read_files(files, path if path.is_dir() else path.parent), tokenizer, cfg)
    return train, val, f"{fmt}: {path}"


def _check_size(train: np.ndarray, val: np.ndarray, seq_len: int, what: str) -> None:
    need = seq_len + 1
    if train.size < need or val.size < need:
        raise DataError(
            f"{what} too small: {train.size} train / {val.size} validation tokens, "
            f"each split needs at least data.seq_len + 1 = {need}"
        )


def _load_mixture(cfg: DataConfig, tokenizer: Tokenizer, vocab_size: int) -> TokenData:
    """Every source read as data.path would be (or built, for a built-in domain) and split alone."""
    sources = []
    for i, spec in enumerate(cfg.mixture):
        label = f"data.mixture source {spec.name!r}"
        try:
            if spec.builtin is not None:
                docs = domains.domain_documents(spec.builtin)
                train, val = _split_documents(docs, tokenizer, cfg)
                described = f"{spec.builtin}: {domains.describe_domain(spec.builtin)}"
            else:
                field = f"data.mixture[{i}].path"
                train, val, described = _read_path(spec.path, field, cfg, tokenizer, vocab_size)
            _check_size(train, val, cfg.seq_len, label)
        except ConfigError as err:
            raise ConfigError(err.field_path, f"source {spec.name!r}: {err.message}") from None
        except DataError as err:
            message = str(err)
            raise DataError(message if message.startswith(label) else f"{label}: {message}") from None
        sources.append(SourceTokens(spec.name, spec.weight, train, val, described))
    # The concatenations serve callers that want one stream (token counts, `sparse-train eval`).
    train = np.concatenate([s.train for s in sources])
    val = np.concatenate([s.val for s in sources])
    description = "mixture: " + "; ".join(f"{s.name} x{s.weight:g} ({s.source})" for s in sources)
    return TokenData(train, val, description, tuple(sources))


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
    """Shuffled non-overlapping windows, one permutation per epoch; state = samples consumed.
    `stream` (a mixture's source number) gives a source its own permutations."""

    def __init__(
        self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, consumed: int = 0, stream: int | None = None
    ) -> None:
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.num_windows = (tokens.size - 1) // seq_len
        if self.num_windows < 1:
            raise DataError(f"stream of {tokens.size} tokens holds no window of {seq_len + 1}")
        self.consumed = consumed
        self._stream = () if stream is None else (stream,)
        self._epoch, self._perm = -1, np.zeros(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch, *self._stream])
            self._epoch, self._perm = epoch, rng.permutation(self.num_windows)
        return self._perm

    def window_starts(self, samples: np.ndarray) -> np.ndarray:
        """Start offsets of the windows of the given sample numbers (0, 1, ... over the run)."""
        epochs, positions = np.divmod(samples, self.num_windows)
        windows = np.array([self._permutation(int(e))[p] for e, p in zip(epochs, positions, strict=True)])
        return windows.astype(np.int64) * self.seq_len

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs [B, S], targets [B, S]) int64; targets are inputs shifted by one."""
        starts = self.window_starts(np.arange(self.consumed, self.consumed + self.batch_size))
        self.consumed += self.batch_size
        return _windows(self.tokens, self.seq_len, starts)

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consumed = int(state["consumed"])


# Sources are drawn in blocks of this many samples, each from its own generator seeded by
# (seed, _MIX_KEY, block): any sample's source is found without drawing all the earlier ones.
_MIX_BLOCK = 4096
_MIX_KEY = 0x6D6978  # "mix": keeps these draws apart from the window permutations' (seed, epoch)


class MixtureSampler:
    """Batches mixing the sources of a mixture by weight.

    Sample n of the run (row n mod B of global micro-batch n // B) comes from source s with
    probability weight_s / sum(weights), drawn from (seed, n) alone; within its source it is that
    source's next window, in the source's own per-epoch permutation (BatchSampler with
    stream = source number). The batches are a function of (seed, samples consumed): every
    parallel layout, which cuts the same global micro-batches into rows per data-parallel rank,
    sees the same ones, and a resume needs no more state than `consumed`.
    """

    def __init__(
        self, streams: list[np.ndarray], weights: list[float], seq_len: int, batch_size: int, seed: int
    ) -> None:
        if len(streams) != len(weights) or not streams:
            raise ValueError(f"{len(streams)} streams for {len(weights)} weights")
        self.sources = [BatchSampler(t, seq_len, 1, seed, stream=i + 1) for i, t in enumerate(streams)]
        total = float(sum(weights))
        self.cumulative = np.cumsum(np.asarray(weights, dtype=np.float64) / total)
        self.cumulative[-1] = 1.0  # no draw may fall past the last source through rounding
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.consumed = 0
        self._taken = np.zeros(len(streams), dtype=np.int64)  # samples drawn from each source so far
        self._block, self._block_sources = -1, np.zeros(0, dtype=np.int64)

    def _sources_in_block(self, block: int) -> np.ndarray:
        if block != self._block:
            draws = np.random.default_rng([self.seed, _MIX_KEY, block]).random(_MIX_BLOCK)
            self._block, self._block_sources = block, np.searchsorted(self.cumulative, draws, side="right")
        return self._block_sources

    def sources_of(self, start: int, stop: int) -> np.ndarray:
        """The source number of every sample in [start, stop)."""
        if stop <= start:
            return np.zeros(0, dtype=np.int64)
        parts = []
        for block in range(start // _MIX_BLOCK, (stop - 1) // _MIX_BLOCK + 1):
            lo, hi = max(start, block * _MIX_BLOCK), min(stop, (block + 1) * _MIX_BLOCK)
            parts.append(self._sources_in_block(block)[lo - block * _MIX_BLOCK : hi - block * _MIX_BLOCK])
        return np.concatenate(parts)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs [B, S], targets [B, S]) int64, as BatchSampler's."""
        chosen = self.sources_of(self.consumed, self.consumed + self.batch_size)
        rows = []
        for s in chosen:
            sampler = self.sources[int(s)]
            start = int(sampler.window_starts(np.array([self._taken[s]]))[0])
            self._taken[s] += 1
            rows.append(np.asarray(sampler.tokens[start : start + self.seq_len + 1], dtype=np.int64))
        self.consumed += self.batch_size
        batch = torch.from_numpy(np.stack(rows))
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume: how many samples each source gave is recounted from the draws."""
        self.consumed = int(state["consumed"])
        self._taken = np.zeros(len(self.sources), dtype=np.int64)
        for block_start in range(0, self.consumed, _MIX_BLOCK):
            chosen = self.sources_of(block_start, min(self.consumed, block_start + _MIX_BLOCK))
            self._taken += np.bincount(chosen, minlength=len(self.sources))


def make_sampler(data: TokenData, seq_len: int, batch_size: int, seed: int) -> BatchSampler | MixtureSampler:
    """The training sampler: a mixture's when the data has sources, else one stream's."""
    if not data.sources:
        return BatchSampler(data.train, seq_len, batch_size, seed)
    return MixtureSampler([s.train for s in data.sources], [s.weight for s in data.sources], seq_len, batch_size, seed)


def validation_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, num_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same fixed windows every time (in order, wrapping), so validation losses compare."""
    num_windows = (tokens.size - 1) // seq_len
    starts = (np.arange(num_batches * batch_size) % num_windows) * seq_len
    return [_windows(tokens, seq_len, chunk) for chunk in np.split(starts, num_batches)]
