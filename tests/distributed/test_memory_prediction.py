"""The memory prediction on a real layout: this rank's shards, and FSDP2's units as FSDP2 made them."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparse_train.launch.local import run_ranks
from tests.distributed.test_layouts import _config, _data


def _predicted_and_counted(cfg, run_dir: str, data) -> dict:
    """The trainer's prediction and, counted here from the model, what its FSDP2 term should be."""
    from torch.distributed.tensor import DTensor

    from sparse_train.train import memory
    from sparse_train.train.trainer import Trainer

    trainer = Trainer(cfg, Path(run_dir), data=data, log=lambda msg: None)
    try:
        p = trainer.predict_memory()
        model, dims = trainer.model, trainer.runtime.dims

        def full_bytes(params) -> int:  # as FSDP2 gathers them: whole over the data-parallel ranks
            return sum(q.numel() * q.element_size() for q in params)

        experts = [m.ffn.experts for m in model.blocks]
        # the experts' unit: this EP rank's experts, whole over its edp (here 1) ranks
        expert_unit = max(memory.local_bytes(e.parameters()) * dims.edp for e in experts)
        expert_ids = {id(q) for e in experts for q in e.parameters()}
        block_unit = max(full_bytes(q for q in b.parameters() if id(q) not in expert_ids) for b in model.blocks)
        root = full_bytes([model.embed.weight, model.norm.weight, model.lm_head.weight])
        local = [q.to_local() if isinstance(q, DTensor) else q for q in model.parameters()]
        return {
            "params_mb": p.params_mb,
            "local_mb": sum(q.numel() * q.element_size() for q in local) / memory.MB,
            "optimizer_mb": p.optimizer_mb,
            "fsdp_mb": p.fsdp_buffers_mb,
            "expected_fsdp_mb": (2 * root + 4 * max(expert_unit, block_unit)) / memory.MB,
            "whole_mb": sum(q.numel() * q.element_size() for q in model.parameters()) / memory.MB,
        }
    finally:
        trainer.close()


@pytest.mark.slow  # two spawned ranks: ~10 s on 2 cores
def test_prediction_counts_each_ranks_shards_and_fsdp2s_largest_unit(tmp_path):
    cfg = _config([], ["parallel.ep=2"])  # 2 ranks: experts over EP, everything else FSDP2 over dp_shard=2
    for rank in run_ranks(_predicted_and_counted, 2, cfg, str(tmp_path), _data()):
        assert rank["params_mb"] == rank["local_mb"] < 0.6 * rank["whole_mb"]  # about half of the model
        assert rank["optimizer_mb"] == 2 * rank["params_mb"]  # fp32 parameters: two fp32 moments each
        assert rank["fsdp_mb"] == rank["expected_fsdp_mb"] > 0
