"""A training step that is not reported (not a logging step) reads nothing back to the host:
losses, the non-finite flag, the gradient norm and load statistics stay on the device, and a
non-finite step is skipped there. A reported step reads a fixed number of times, however many
micro-batches it accumulates and however deep the model.

Host reads (`float(t)`, `t.item()`, `bool(t)`) are the dispatcher's `_local_scalar_dense` /
`is_nonzero`, seen by a dispatch mode and attributed to their call site. Reads inside the model
and kernels (the dropless dispatch needs its split sizes on the host) are not the loop's."""

from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path

from tests.conftest import tiny_config
from tests.distributed.test_layouts import _data

HOST_READS = ("_local_scalar_dense", "is_nonzero", "aten::item")
MODEL_CODE = ("/sparse_train/models/", "/sparse_train/kernels/", "/sparse_train/parallel/dispatch.py")


def _host_reads_of_one_step(tmp_path: Path, *overrides: str, report: bool = True) -> Counter[str]:
    from torch.utils._python_dispatch import TorchDispatchMode

    from sparse_train.train.trainer import Trainer

    seen: Counter[str] = Counter()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            stack = traceback.extract_stack()
            if any(r in func.name() for r in HOST_READS):
                ours = [f for f in stack if "/sparse_train/" in f.filename]
                if ours and not any(m in ours[-1].filename for m in MODEL_CODE):
                    seen[f"{Path(ours[-1].filename).name}:{ours[-1].name}"] += 1
            return func(*args, **(kwargs or {}))

    trainer = Trainer(tiny_config(*overrides), tmp_path, data=_data(), log=lambda msg: None)
    try:
        trainer.train_step()
        with Record():
            trainer.train_step(report=report)
    finally:
        trainer.close()
    return seen


def test_host_reads_per_step_do_not_grow_with_micro_batches_or_depth(tmp_path):
    counts = {
        (accum, depth): _host_reads_of_one_step(
            tmp_path / f"a{accum}-d{depth}", f"train.grad_accum={accum}", f"model.n_layers={depth}"
        )
        for accum, depth in ((2, 2), (4, 2), (2, 4))
    }
    assert counts[(2, 2)] == counts[(4, 2)] == counts[(2, 4)], counts
    assert sum(counts[(2, 2)].values()) <= 4, counts[(2, 2)]


def test_a_step_that_is_not_reported_reads_nothing_back(tmp_path):
    for accum, depth in ((2, 2), (4, 4)):
        seen = _host_reads_of_one_step(
            tmp_path / f"a{accum}-d{depth}", f"train.grad_accum={accum}", f"model.n_layers={depth}", report=False
        )
        assert not seen, seen
