"""Layout validation: one-line errors naming every degree, raised before any process group exists."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from sparse_train.cli import main
from sparse_train.config import ConfigError, ParallelConfig
from sparse_train.parallel.dims import ParallelDims
from tests.conftest import tiny_config, tiny_overrides


def _dims(world: int, **degrees) -> ParallelDims:
    return ParallelDims.from_config(ParallelConfig(**degrees), world)


def test_product_mismatch_names_every_degree_and_the_world_size():
    with pytest.raises(ConfigError) as err:
        _dims(2, dp_shard=2, tp=2)
    assert str(err.value) == "parallel: dp_replicate(1) * dp_shard(2) * tp(2) * pp(1) = 4 != WORLD_SIZE(2)"


def test_dp_shard_minus_one_takes_the_remaining_ranks_and_ep_folds_into_them():
    dims = _dims(8, tp=2, ep=2)
    assert (dims.dp_replicate, dims.dp_shard, dims.tp, dims.pp, dims.ep, dims.edp) == (1, 4, 2, 1, 2, 2)
    with pytest.raises(
        ConfigError, match=r"dp_replicate\(1\) \* tp\(3\) \* pp\(1\) = 3 does not divide WORLD_SIZE\(4\)"
    ):
        _dims(4, tp=3)


@pytest.mark.parametrize(
    ("world", "degrees", "overrides", "message"),
    [
        (2, {"ep": 4}, [], r"parallel.ep: must divide the data-parallel ranks .* = 2 .*got 4"),
        (3, {"ep": 3}, ["moe.num_experts=4"], r"parallel.ep: must divide moe.num_experts \(4\), got 3"),
        (4, {"pp": 4, "dp_shard": 1}, ["train.grad_accum=4"], r"parallel.pp: must be <= model.n_layers \(2\), got 4"),
        (2, {"pp": 2, "dp_shard": 1}, [], r"parallel.pp: 1F1B runs train.grad_accum \(1\) micro-batches"),
        (
            2,
            {"tp": 2, "dp_shard": 1},
            ["model.n_heads=1", "model.d_model=32"],
            r"parallel.tp: must divide model.n_heads",
        ),
        (2, {"tp": 2, "dp_shard": 1}, ["moe.expert_hidden=33"], r"parallel.tp: must divide moe.expert_hidden \(33\)"),
        (4, {}, ["train.batch_size=6"], r"train.batch_size: .*must be divisible by 4, got 6"),
        (4, {"ep": 4}, ["model.ffn=fff", "fff.depth=1"], r"parallel.ep: must divide the FFF leaf count .*\(2\)"),
        (2, {"tp": 2, "dp_shard": 1}, ["model.ffn=fff", "fff.leaf_width=5"], r"parallel.tp: must divide fff.leaf"),
    ],
)
def test_model_dependent_layout_errors(world, degrees, overrides, message):
    cfg = tiny_config(*overrides)
    with pytest.raises(ConfigError, match=message):
        ParallelDims.from_config(ParallelConfig(**degrees), world).check_model(cfg)


def test_bad_layout_exits_2_with_one_line_before_any_worker_or_process_group(capsys):
    args = [f"--set={o}" for o in tiny_overrides()]
    assert main(["launch", "--nproc-per-node", "2", "train", *args, "--set", "parallel.tp=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "tp(3)" in err and "WORLD_SIZE(2)" in err
    # one process, layout for more: refused by the trainer before it starts a process group
    assert main(["train", *args, "--set", "parallel.ep=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "parallel.ep" in err
    assert not dist.is_initialized()


def test_launch_without_a_command_is_a_usage_error(capsys):
    assert main(["launch", "--nproc-per-node", "2"]) == 2
    assert "name the command" in capsys.readouterr().err
