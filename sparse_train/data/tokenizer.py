"""Tokenizers: byte-level (ids 0..255 are the UTF-8 bytes, then special tokens), or a Hugging
Face tokenizer read from a local directory (a checkpoint's tokenizer.json / tokenizer.model).

Both return token ids as numpy arrays of one dtype per tokenizer (uint16, or uint32 when the
vocabulary does not fit 16 bits), so streams concatenate without copies or overflow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from sparse_train.config import ConfigError, DataConfig


class Tokenizer(Protocol):
    name: str
    eot_id: int  # end of text: separates documents in the token stream
    vocab_size: int

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: list[int] | np.ndarray) -> str: ...


class ByteTokenizer:
    name = "byte"
    eot_id = 256
    pad_id = 257
    vocab_size = 258

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def encode_bytes(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: list[int] | np.ndarray) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer from a local directory; documents are separated by its EOS token."""

    name = "hf"

    def __init__(self, path: str | Path) -> None:
        if not Path(path).is_dir():
            raise ConfigError("data.tokenizer_path", f"no such directory: {path}")
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ConfigError(
                "data.tokenizer", "hf tokenizers need transformers: pip install 'sparse_train[hf]'"
            ) from None
        try:
            self._hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, TypeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError("data.tokenizer_path", f"cannot load a tokenizer from {path}: {first}") from None
        eos = self._hf.eos_token_id
        if eos is None:
            raise ConfigError("data.tokenizer_path", f"the tokenizer in {path} has no EOS token to separate documents")
        self.eot_id = int(eos)
        self.vocab_size = len(self._hf)
        self._dtype = np.uint16 if self.vocab_size <= 2**16 else np.uint32
        # The fast tokenizer's backend encodes without the wrapper's "longer than the model"
        # warnings: documents are cut into training windows afterwards.
        self._backend = getattr(self._hf, "backend_tokenizer", None)

    def encode(self, text: str) -> np.ndarray:
        if self._backend is not None:
            ids = self._backend.encode(text, add_special_tokens=False).ids
        else:
            ids = self._hf.encode(text, add_special_tokens=False)
        return np.asarray(ids, dtype=self._dtype)

    def decode(self, ids: list[int] | np.ndarray) -> str:
        return self._hf.decode([int(i) for i in ids])


def build_tokenizer(cfg: DataConfig) -> ByteTokenizer | HFTokenizer:
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer == "hf":
        return HFTokenizer(Path(cfg.tokenizer_path).expanduser())
    raise ValueError(f"unknown tokenizer {cfg.tokenizer!r}; allowed: byte, hf")
