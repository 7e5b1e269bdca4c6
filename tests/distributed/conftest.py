"""The multi-process tests start their ranks from a forkserver that has imported torch and the
trainer once (sparse_train.launch.local.START_METHOD): seconds per rank on 2 cores."""

from __future__ import annotations

import pytest

from sparse_train.launch import local


@pytest.fixture(autouse=True)
def _ranks_fork_from_a_preloaded_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local, "START_METHOD", "forkserver")
