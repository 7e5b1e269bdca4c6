"""Publishing a file or a directory atomically: the one place that writes under a temporary
name, fsyncs and renames.

A reader (another process, or this one after a crash or a power loss) sees either the old
target or the complete new one, never a half-written one: the content is written under a
hidden temporary name beside the target (the same directory, so the same filesystem, where
`rename` is atomic), fsynced, renamed onto the target, and the parent directory is fsynced so
that the rename itself is durable. Checkpoints, consolidated weights, upcycled models, sweep
records and truncated metrics all go through here.

Torch-free: the CLI and the sweep runner use it without importing torch.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def temporary_path(target: Path, tag: str = "tmp") -> Path:
    """A hidden name beside `target`, unique to this process (concurrent writers do not collide)."""
    return target.parent / f".{target.name}.{tag}-{os.getpid()}"


def fsync(path: Path) -> None:
    """Flush a file's or a directory's entry to stable storage (a directory: the names in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (a file: itself), the deepest first, then `root`."""
    if root.is_dir():
        for directory, _dirs, files in os.walk(root, topdown=False):
            for name in files:
                fsync(Path(directory) / name)
            fsync(Path(directory))
    else:
        fsync(root)


def remove(path: Path) -> None:
    """Delete a file or a directory tree if it exists (leftovers of an interrupted write)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def publish(tmp: Path, target: Path) -> None:
    """Make the complete `tmp` (a file or a directory beside `target`) appear as `target`.

    A file replaces an existing target in the one rename. A directory cannot replace a
    non-empty directory in one rename (POSIX), so an existing target directory is first moved
    aside and deleted once the new one is in place: a crash between those two renames leaves
    the old copy under a hidden `.NAME.old-PID` name and no target. Callers that must never
    have that window (checkpoints) publish under a fresh name instead.
    """
    if tmp.parent.resolve() != target.parent.resolve():
        raise ValueError(f"{tmp} is not beside {target}: a rename across directories may not be atomic")
    fsync_tree(tmp)
    if target.is_dir() and tmp.is_dir():
        stale = temporary_path(target, "old")
        os.replace(target, stale)
        os.replace(tmp, target)
        fsync(target.parent)
        shutil.rmtree(stale)
        return
    os.replace(tmp, target)
    fsync(target.parent)  # the rename is an entry of the parent: durable only once it is flushed


@contextlib.contextmanager
def writing(target: Path, *, directory: bool = False) -> Iterator[Path]:
    """A temporary path beside `target` to write into (created empty when `directory`); it is
    published as `target` when the block ends, and removed instead if the block raises."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(target)
    remove(tmp)  # left by an earlier process of the same id that was killed
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        publish(tmp, target)
    finally:
        remove(tmp)


def write_text(target: Path, text: str) -> None:
    """Replace the file `target` by `text`, atomically."""
    with writing(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
