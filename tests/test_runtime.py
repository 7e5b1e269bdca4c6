from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sparse_train.runtime import MALLOC_ENV, tuned_allocator_env


@pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc tuning is Linux-only")
def test_entry_point_reexecs_once_with_malloc_tuning():
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV and k != "SPARSE_TRAIN_MALLOC_TUNING"}
    proc = subprocess.run(
        [sys.executable, "-m", "sparse_train", "info"], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["malloc_tuning"] == MALLOC_ENV


def test_tuning_respects_opt_out_and_user_values():
    assert tuned_allocator_env({"SPARSE_TRAIN_MALLOC_TUNING": "0"}) is None
    assert tuned_allocator_env(dict(MALLOC_ENV)) is None  # already tuned: no second exec
    if sys.platform == "linux":
        env = tuned_allocator_env({"MALLOC_TOP_PAD_": "7"})
        assert env is not None and env["MALLOC_TOP_PAD_"] == "7" and env["MALLOC_MMAP_THRESHOLD_"] == str(32 << 20)
