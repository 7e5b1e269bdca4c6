"""Where documents come from: the Python standard library (default), text files, JSONL, or .bin.

Every reader yields (document id, text) pairs in a deterministic order; the id decides the
train/validation split by a hash, so the split does not move when the seed changes.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from sparse_train.errors import DataError

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".text", ".json", ".csv", ".html", ".c", ".h", ".yaml", ".yml"}


def stdlib_root() -> Path:
    """The running interpreter's standard library (the same in a virtualenv as outside it)."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The standard library's own .py sources, without tests and installed packages."""
    root = stdlib_root()
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in skip]  # prune: never walk installed packages
        files.extend(Path(folder) / n for n in names if n.endswith(".py"))
    if not files:
        raise DataError(f"no Python sources found under the standard library at {root}")
    return sorted(files)


def text_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise DataError(f"{path}: no text files ({', '.join(sorted(TEXT_SUFFIXES))}) in this directory")
    return files


def read_files(files: list[Path], root: Path) -> Iterator[tuple[str, str]]:
    for f in files:
        try:
            text = f.read_text(encoding="utf-8", errors="replace")
        except OSError as err:
            raise DataError(f"{f}: cannot read ({err.strerror})") from None
        yield str(f.relative_to(root) if f != root else f.name), text


def read_jsonl(path: Path, field: str) -> Iterator[tuple[str, str]]:
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_no}: invalid JSON ({err.msg})") from None
            if not isinstance(record, dict) or field not in record:
                raise DataError(f"{path}:{line_no}: no {field!r} field (set data.text_field)")
            if not isinstance(record[field], str):
                raise DataError(f"{path}:{line_no}: field {field!r} is not a string")
            yield f"{path.name}:{line_no}", record[field]


def detect_format(path: Path) -> str:
    if path.is_dir():
        return "text"
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".bin":
        return "bin"
    return "text"
