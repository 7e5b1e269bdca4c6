"""Construction on the meta device: every layout starts from bit-identical weights, and no rank
ever creates a whole tensor of a parameter it holds only part of.

Each rank builds the trainer (model on meta, layout applied, its shards allocated and drawn)
under a dispatch mode that records the shape of every tensor any operation creates. The
weights, gathered whole, must equal the single process's exactly (torch.equal, not a
tolerance): initialisation depends on the seed and on each element's place in its whole
tensor, never on the layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sparse_train.launch.local import run_ranks
from sparse_train.models.init import TILE_ELEMENTS
from tests.distributed.test_layouts import FFF, _config, _data

# Experts wide enough that a whole expert weight is several init tiles: drawing it whole would show.
WIDE = ["moe.num_experts=8", "moe.expert_hidden=256", "fff.leaf_width=512"]
LAYOUTS = {
    # name: (processes, parallel overrides, model overrides)
    "ep2-dp_shard2": (2, ["parallel.ep=2"], ["moe.num_shared_experts=1"]),
    "tp2": (2, ["parallel.tp=2"], []),
    "pp2": (2, ["parallel.pp=2"], []),
    "fff-ep2": (2, ["parallel.ep=2"], [*FFF, "fff.depth=3", "fff.master_leaf=true"]),
    "tp2-ep2": (4, ["parallel.tp=2", "parallel.ep=2"], []),
    "hsdp2x2-ep2": (4, ["parallel.dp_replicate=2", "parallel.dp_shard=2", "parallel.ep=2"], []),
}
FAST = {"ep2-dp_shard2"}  # FSDP2 and experts sharded together; the others run in the slow suite


def _build(cfg, run_dir: str, data) -> dict:
    """The whole initial weights (gathered), and the whole-tensor shapes of the parameters this
    rank holds a part of that some operation created while the trainer was being built."""
    from sparse_train.train.trainer import Trainer
    from tests.distributed.created_tensors import RecordCreated, local_of, partial_whole_shapes

    with RecordCreated() as record:
        trainer = Trainer(cfg, Path(run_dir), data=data, log=lambda msg: None)
    try:
        partial_wholes = partial_whole_shapes(trainer.model, larger_than=TILE_ELEMENTS)
        largest_local = max(local_of(p).numel() for p in trainer.model.parameters())
        weights = trainer.engine.full_state_dict()
    finally:
        trainer.close()
    created = record.shapes
    return {
        "weights": weights,
        "sharded": sorted(partial_wholes),
        "whole_copies": sorted({s for s in created if s in partial_wholes}),
        "largest_created": max((torch.Size(s).numel() for s in created), default=0),
        "largest_local": largest_local,
    }


@pytest.mark.parametrize("layout", [pytest.param(n, marks=[] if n in FAST else [pytest.mark.slow]) for n in LAYOUTS])
def test_every_layout_starts_from_the_same_weights_without_whole_copies(layout, tmp_path):
    from sparse_train.train.trainer import Trainer

    world, parallel, model_extra = LAYOUTS[layout]
    data = _data()
    single = Trainer(_config([*model_extra, *WIDE], []), tmp_path / "single", data=data, log=lambda msg: None)
    reference = {name: t.detach().clone() for name, t in single.model.state_dict().items()}
    runs = run_ranks(_build, world, _config([*model_extra, *WIDE], parallel), str(tmp_path / layout), data)

    weights = runs[0]["weights"]
    assert sorted(weights) == sorted(reference)
    different = [name for name in reference if not torch.equal(weights[name], reference[name])]
    assert not different, f"{layout}: initial weights differ from one process's in {different}"
    for rank, run in enumerate(runs):
        if layout != "pp2":  # pipeline stages hold whole tensors: nothing is sharded
            assert run["sharded"], f"{layout}: rank {rank} should hold some parameter in part"
        assert not run["whole_copies"], f"{layout}: rank {rank} created whole tensors {run['whole_copies']}"
        bound = max(run["largest_local"], TILE_ELEMENTS)
        assert run["largest_created"] <= bound, f"{layout}: rank {rank} created {run['largest_created']} elements"


def test_tiles_do_not_depend_on_the_region_drawn():
    """The same elements come out whether a tensor is drawn whole or in any boxes."""
    from sparse_train.models.init import draw_region

    def fill(out, g):
        return out.normal_(generator=g)

    shape = (3, 40, 2, 1500)  # tiles of [1, 21, 2, 1500]: boxes cross tile edges on every dim
    whole = draw_region("w", 7, shape, (0, 0, 0, 0), shape, fill)
    box = draw_region("w", 7, shape, (1, 17, 1, 700), (2, 20, 1, 777), fill)
    assert torch.equal(box, whole[1:3, 17:37, 1:2, 700:1477])
    assert not torch.equal(draw_region("w", 8, shape, (0,) * 4, shape, fill), whole), "the seed must matter"
    assert not torch.equal(draw_region("v", 7, shape, (0,) * 4, shape, fill), whole), "the name must matter"
