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


def test_cuda_runs_serve_cpu_tensors_too_and_cpu_runs_use_gloo():
    """Decision 45: on CUDA every group serves CUDA tensors by NCCL and CPU ones by gloo."""
    from torch.distributed.distributed_c10d import BackendConfig

    from sparse_train.parallel.runtime import process_group_backend

    # what torch.distributed makes of the string (the device -> backend map every group gets)
    assert BackendConfig(process_group_backend("cuda")).get_device_backend_map() == {"cuda": "nccl", "cpu": "gloo"}
    assert BackendConfig(process_group_backend("cpu")).get_device_backend_map()["cpu"] == "gloo"
