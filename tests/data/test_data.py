from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sparse_train.config import DataConfig
from sparse_train.data.corpus import DataError, stdlib_files
from sparse_train.data.dataset import BatchSampler, load_token_data, validation_batches
from sparse_train.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def test_byte_tokenizer_roundtrip_including_unicode():
    text = "def f(x):\n    return 'héllo ∑'\n"
    ids = TOK.encode(text)
    assert ids.max() < 256 and TOK.decode(ids) == text
    assert TOK.decode([*ids.tolist(), TOK.eot_id]) == text  # specials are not bytes


def test_default_corpus_is_the_stdlib_and_needs_no_download():
    files = stdlib_files()
    names = {f.name for f in files}
    assert {"os.py", "json.py"} & names or "__init__.py" in names
    assert not any("site-packages" in f.parts for f in files)
    data = load_token_data(DataConfig(seq_len=64), TOK, TOK.vocab_size)
    assert data.train.size > 1_000_000 and data.val.size > 10_000
    assert "standard library" in data.source


def test_split_is_deterministic_and_disjoint(tmp_path):
    for i in range(40):
        (tmp_path / f"doc{i}.txt").write_text(f"document number {i} " * 20)
    cfg = DataConfig(path=str(tmp_path), seq_len=16, val_fraction=0.25)
    a, b = load_token_data(cfg, TOK, TOK.vocab_size), load_token_data(cfg, TOK, TOK.vocab_size)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    train_docs = set(TOK.decode(a.train).split("document number ")[1:])
    val_docs = set(TOK.decode(a.val).split("document number ")[1:])
    assert train_docs and val_docs and not train_docs & val_docs


def test_jsonl_reads_field_and_reports_bad_lines(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps({"body": f"text {i} " * 30}) for i in range(30)))
    data = load_token_data(DataConfig(path=str(good), text_field="body", seq_len=16), TOK, TOK.vocab_size)
    assert "text 3 " in TOK.decode(np.concatenate([data.train, data.val]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{not json}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        load_token_data(DataConfig(path=str(bad), seq_len=4), TOK, TOK.vocab_size)
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"content": "x"}\n')
    with pytest.raises(DataError, match=r"missing.jsonl:1: no 'text' field"):
        load_token_data(DataConfig(path=str(missing), seq_len=4), TOK, TOK.vocab_size)


def test_bin_memmap_uint16_and_uint32(tmp_path):
    tokens = np.arange(1000) % 300
    (tmp_path / "a.bin").write_bytes(tokens.astype(np.uint16).tobytes())
    (tmp_path / "b.bin").write_bytes(tokens.astype(np.uint32).tobytes())
    a = load_token_data(DataConfig(path=str(tmp_path / "a.bin"), seq_len=16, val_fraction=0.1), TOK, 300)
    b = load_token_data(
        DataConfig(path=str(tmp_path / "b.bin"), bin_dtype="uint32", seq_len=16, val_fraction=0.1), TOK, 300
    )
    assert np.array_equal(np.concatenate([a.train, a.val]), tokens)
    assert np.array_equal(np.concatenate([b.train, b.val]), tokens)
    with pytest.raises(DataError, match=r"token id 299 >= model.vocab_size \(258\)"):
        load_token_data(DataConfig(path=str(tmp_path / "a.bin"), seq_len=16), TOK, 258)
    (tmp_path / "odd.bin").write_bytes(b"\x00" * 7)
    with pytest.raises(DataError, match="not a multiple of uint16"):
        load_token_data(DataConfig(path=str(tmp_path / "odd.bin"), seq_len=2), TOK, 300)


def test_too_small_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "tiny.txt").write_text("abc")
    with pytest.raises(DataError, match="corpus too small"):
        load_token_data(DataConfig(path=str(tmp_path / "tiny.txt"), seq_len=64), TOK, TOK.vocab_size)


def test_empty_directory_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no text files"):
        load_token_data(DataConfig(path=str(tmp_path), seq_len=8), TOK, TOK.vocab_size)


def test_sampler_targets_are_shifted_inputs_and_resume_exactly():
    tokens = np.arange(1000, dtype=np.uint16)
    s = BatchSampler(tokens, seq_len=10, batch_size=4, seed=3)
    x, y = s.next_batch()
    assert torch.equal(x[:, 1:], y[:, :-1])
    batches = [s.next_batch() for _ in range(60)]  # crosses several epochs (99 windows)
    resumed = BatchSampler(tokens, seq_len=10, batch_size=4, seed=3)
    resumed.load_state_dict({"consumed": 4})
    for (xa, ya), (xb, yb) in zip(batches, (resumed.next_batch() for _ in range(60)), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_sampler_visits_every_window_once_per_epoch_and_seed_changes_order():
    tokens = np.arange(81, dtype=np.uint16)  # 10 windows of 8 + 1
    s = BatchSampler(tokens, seq_len=8, batch_size=5, seed=0)
    starts = torch.cat([s.next_batch()[0][:, 0] for _ in range(2)])
    assert sorted(starts.tolist()) == list(range(0, 80, 8))
    other = BatchSampler(tokens, seq_len=8, batch_size=5, seed=1).next_batch()[0][:, 0]
    assert not torch.equal(starts[:5], other)


def test_validation_batches_are_fixed():
    tokens = np.arange(500, dtype=np.uint16)
    a = validation_batches(tokens, 16, 4, 3)
    b = validation_batches(tokens, 16, 4, 3)
    assert len(a) == 3 and all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, b, strict=True))
