"""data.mixture: each source read and split alone; batches mix the sources by weight."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sparse_train.config import ConfigError
from sparse_train.data import domains
from sparse_train.data.corpus import DataError, stdlib_root
from sparse_train.data.dataset import BatchSampler, MixtureSampler, TokenData, load_token_data, make_sampler
from sparse_train.data.tokenizer import ByteTokenizer
from tests.conftest import tiny_config
from tests.data.test_domains import _headers_or_skip

TOK = ByteTokenizer()


def _streams() -> list[np.ndarray]:
    # source i holds only tokens in [100 i, 100 i + 50): a row tells which source it came from
    rng = np.random.default_rng(0)
    return [(100 * i + rng.integers(0, 50, size)).astype(np.uint16) for i, size in enumerate((5_000, 20_000, 3_000))]


def _source_of_rows(inputs) -> np.ndarray:
    rows = inputs.numpy() // 100
    assert (rows == rows[:, :1]).all(), "a row mixes sources"
    return rows[:, 0]


def test_mixture_follows_the_weights_and_is_deterministic():
    weights = [1.0, 3.0, 0.5]
    a = MixtureSampler(_streams(), weights, seq_len=16, batch_size=8, seed=5)
    b = MixtureSampler(_streams(), weights, seq_len=16, batch_size=8, seed=5)
    counts = np.zeros(3)
    for _ in range(1_000):
        batch_a, batch_b = a.next_batch(), b.next_batch()
        assert all((x == y).all() for x, y in zip(batch_a, batch_b, strict=True))
        assert (batch_a[1][:, :-1] == batch_a[0][:, 1:]).all()
        counts += np.bincount(_source_of_rows(batch_a[0]), minlength=3)
    share = counts / counts.sum()
    np.testing.assert_allclose(share, np.array(weights) / sum(weights), atol=0.01)
    other = MixtureSampler(_streams(), weights, seq_len=16, batch_size=8, seed=6).next_batch()[0]
    assert not (other == MixtureSampler(_streams(), weights, seq_len=16, batch_size=8, seed=5).next_batch()[0]).all()


def test_each_source_visits_all_its_windows_once_per_epoch():
    streams = _streams()
    sampler = MixtureSampler(streams, [1.0, 1.0, 1.0], seq_len=16, batch_size=4, seed=0)
    seen: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for _ in range(200):
        inputs, _ = sampler.next_batch()
        for row in inputs.numpy():
            s = int(row[0] // 100)
            seen[s].append(row.tobytes())
    windows = (streams[2].size - 1) // 16  # the smallest source has gone past one epoch
    assert len(seen[2]) > windows
    assert len(set(seen[2][:windows])) == windows


def test_mixture_resumes_from_the_consumed_count_alone():
    weights = [2.0, 1.0, 1.0]
    run = MixtureSampler(_streams(), weights, seq_len=16, batch_size=8, seed=1)
    for _ in range(700):  # past the first block of draws (4096 samples)
        run.next_batch()
    resumed = MixtureSampler(_streams(), weights, seq_len=16, batch_size=8, seed=1)
    resumed.load_state_dict(run.state_dict())
    assert run.state_dict() == {"consumed": 5_600}
    for _ in range(3):
        assert (run.next_batch()[0] == resumed.next_batch()[0]).all()


def test_a_single_stream_keeps_its_sampler():
    tokens = np.arange(1_000, dtype=np.uint16)
    assert isinstance(make_sampler(TokenData(tokens, tokens, "x"), 16, 4, 0), BatchSampler)


def _write_sources(tmp_path):
    letters = tmp_path / "letters"
    letters.mkdir()
    rng = np.random.default_rng(0)
    for i in range(60):
        words = ["".join(rng.choice(list("abcdefgh"), 5)) for _ in range(40)]
        (letters / f"doc{i:02d}.txt").write_text(" ".join(words))
    digits = tmp_path / "digits.jsonl"
    digits.write_text(
        "".join(json.dumps({"text": " ".join(map(str, rng.integers(0, 999, 50)))}) + "\n" for _ in range(60))
    )
    return letters, digits


def _mixture(*sources: str, extra: tuple[str, ...] = ()):
    return tiny_config("data.mixture=[" + ", ".join(sources) + "]", *extra).data


def test_load_token_data_reads_every_source_apart(tmp_path):
    letters, digits = _write_sources(tmp_path)
    cfg = _mixture(f"{{name: letters, path: {letters}}}", f"{{name: digits, path: {digits}, weight: 3}}")
    data = load_token_data(cfg, TOK, TOK.vocab_size)
    assert [(s.name, s.weight) for s in data.sources] == [("letters", 1.0), ("digits", 3.0)]
    by_name = {s.name: s for s in data.sources}
    alone = load_token_data(tiny_config(f"data.path={letters}").data, TOK, TOK.vocab_size)
    assert (by_name["letters"].train == alone.train).all() and (by_name["letters"].val == alone.val).all()
    assert set(np.unique(by_name["digits"].train)) <= set(TOK.encode("0123456789 ").tolist()) | {TOK.eot_id}
    assert data.train.size == sum(s.train.size for s in data.sources)
    assert data.val.size == sum(s.val.size for s in data.sources)
    assert "letters" in data.source and "digits x3" in data.source


def test_an_unknown_path_is_one_line_naming_the_source(tmp_path):
    letters, _ = _write_sources(tmp_path)
    cfg = _mixture(f"{{name: letters, path: {letters}}}", f"{{name: web, path: {tmp_path / 'nope'}}}")
    with pytest.raises(ConfigError) as err:
        load_token_data(cfg, TOK, TOK.vocab_size)
    assert str(err.value) == f"data.mixture[1].path: source 'web': no such file or directory: {tmp_path / 'nope'}"


def test_a_source_too_small_is_one_line_naming_it(tmp_path):
    letters, _ = _write_sources(tmp_path)
    (tmp_path / "tiny.txt").write_text("too short")
    cfg = _mixture(f"{{name: letters, path: {letters}}}", f"{{name: tiny, path: {tmp_path / 'tiny.txt'}}}")
    with pytest.raises(DataError) as err:
        load_token_data(cfg, TOK, TOK.vocab_size)
    assert "\n" not in str(err.value) and str(err.value).startswith("data.mixture source 'tiny' too small")


def test_builtin_sources_load_through_the_same_split(monkeypatch):
    # a few modules stand in for the whole library (seconds to split): the path is the same
    _headers_or_skip()
    root = stdlib_root()
    monkeypatch.setattr(domains, "stdlib_files", lambda: [root / p for p in ("argparse.py", "textwrap.py", "shlex.py")])
    domains._stdlib_split.cache_clear()
    try:
        cfg = _mixture("{name: py, builtin: code}", "{name: en, builtin: prose}", "{name: c, builtin: headers}")
        data = load_token_data(cfg, TOK, TOK.vocab_size)
    finally:
        domains._stdlib_split.cache_clear()
    assert [s.name for s in data.sources] == ["py", "en", "c"]
    assert all(s.train.size > 1_000 and s.val.size > 32 for s in data.sources)
    assert data.sources[0].source.startswith("code: Python standard library code")


def test_a_missing_builtin_domain_is_one_line_naming_source_and_domain(tmp_path, monkeypatch):
    monkeypatch.setattr(domains, "header_roots", lambda: [(tmp_path / "include", "**/*.h")])
    with pytest.raises(DataError) as err:
        load_token_data(_mixture("{name: c, builtin: headers}"), TOK, TOK.vocab_size)
    assert str(err.value) == (
        f"data.mixture source 'c': built-in domain 'headers': no C headers found (looked in {tmp_path}/include/**/*.h)"
    )
