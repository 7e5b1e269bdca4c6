from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sparse_train import atomic


def test_write_text_replaces_a_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "deep" / "record.json"
    atomic.write_text(target, "one\n")
    atomic.write_text(target, "two\n")
    assert target.read_text() == "two\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["record.json"]


def test_a_failed_write_keeps_the_old_target_and_removes_the_temporary(tmp_path):
    target = tmp_path / "out"
    atomic.write_text(target, "old\n")
    with pytest.raises(RuntimeError, match="writer died"), atomic.writing(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("writer died")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_directories_are_published_whole_and_replace_an_existing_one(tmp_path):
    target = tmp_path / "model"
    for version in ("1", "2"):
        with atomic.writing(target, directory=True) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".model.tmp-")
            (tmp / "sub").mkdir()
            (tmp / "sub" / "weights").write_text(version)
            if target.exists():  # the old version stays in place until the new one is complete
                assert (target / "sub" / "weights").read_text() == "1"
    assert (target / "sub" / "weights").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_publish_refuses_a_temporary_elsewhere(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_text("x")
    with pytest.raises(ValueError, match="not beside"):
        atomic.publish(tmp_path / "a" / "f", tmp_path / "f")


def test_publish_fsyncs_content_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = atomic.fsync, os.replace
    monkeypatch.setattr(atomic, "fsync", lambda p: calls.append(("fsync", p.name)) or real_fsync(p))
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: calls.append(("rename", b.name)) or real_replace(a, b))
    with atomic.writing(tmp_path / "target", directory=True) as tmp:
        (tmp / "f").write_text("x")
    assert calls.index(("fsync", "f")) < calls.index(("rename", "target")) < calls.index(("fsync", tmp_path.name))


def test_importing_it_does_not_import_torch():
    code = "import sys, sparse_train.atomic; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
