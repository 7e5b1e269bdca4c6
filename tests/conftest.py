"""Shared fixtures: a tiny config that trains in a second, and helpers to run the CLI in-process."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: many small test processes share 2 cores
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidiactl"):
    # No GPU: run Triton kernels on CPU tensors through the interpreter. Must be set before any
    # @triton.jit function is defined, i.e. before sparse_train.kernels.triton_kernels is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from sparse_train.config import Config, load_config  # noqa: E402

TINY = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.max_seq_len=32",
    "moe.num_experts=4",
    "moe.expert_hidden=32",
    "router.top_k=2",
    "data.seq_len=32",
    "train.batch_size=4",
    "train.steps=20",
    "train.log_every=1",
    "train.eval_every=10",
    "train.eval_batches=2",
    "optimizer.warmup_steps=2",
    "checkpoint.every=10",
    "checkpoint.keep=5",
    "logging.progress=false",
    "logging.tensorboard=false",
    "logging.plots=false",
]


def tiny_overrides(*extra: str) -> list[str]:
    return TINY + list(extra)


def tiny_config(*extra: str) -> Config:
    return load_config(None, tiny_overrides(*extra))


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
