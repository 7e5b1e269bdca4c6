"""Each architecture imported from Hugging Face trains alike in every layout: `train --init-from`
a small random model built by transformers, then a few steps on one process and on
ep=2 / tp=2 x ep=2 (dense models: dp_shard=2 / tp=2; DeepSeek-V3 with a multi-token
prediction module), compared as in test_layouts (losses,
gradient norms, first-step gradients and final weights to 1e-5 relative)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sparse_train.launch.local import run_ranks
from tests.distributed.test_layouts import BASE, _assert_same_tensors, _data, train_steps
from tests.upcycle.conftest import build_hf, save_deepseek_v3_with_mtp

# the layout tests' training settings; the model sections come from the HF source
RUN = [o for o in BASE if o.split(".")[0] in ("train", "optimizer", "checkpoint")]
RUN += ["moe.kernel_backend=torch", "router.balance_scope=global_batch", "data.seq_len=16"]
# tp2-ep2 runs each architecture's experts expert-parallel as ep2 would (ep=2 over the
# data-parallel ranks) and its attention tensor-parallel on top; ep2 alone is test_layouts'
MOE_LAYOUTS = {"tp2-ep2": (4, ["parallel.tp=2", "parallel.ep=2"])}
DENSE_LAYOUTS = {"dp_shard2": (2, ["parallel.dp_shard=2"]), "tp2": (2, ["parallel.tp=2"])}
KINDS = {"qwen3": DENSE_LAYOUTS, "qwen3moe": MOE_LAYOUTS, "olmoe": MOE_LAYOUTS, "deepseek_v3": MOE_LAYOUTS,
         "gpt_oss": MOE_LAYOUTS}  # fmt: skip
CASES = [(kind, layout) for kind, layouts in KINDS.items() for layout in layouts]


def _train_from(source: str, overrides: list[str], run_dir: str, data):
    from sparse_train.train.trainer import Trainer
    from sparse_train.upcycle.init_from import init_from

    cfg, weights = init_from(Path(source), None, overrides)
    return train_steps(Trainer(cfg, Path(run_dir), init_weights=weights, data=data, log=lambda msg: None))


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "layout"), CASES, ids=[f"{k}-{lay}" for k, lay in CASES])
def test_an_imported_architecture_trains_alike_in_every_layout(kind, layout, tmp_path):
    source = tmp_path / kind
    build_hf(kind, vocab_size=258).save_pretrained(source)  # the byte tokenizer's ids
    if kind == "deepseek_v3":  # with its multi-token prediction module, as DeepSeek's checkpoints
        save_deepseek_v3_with_mtp(source, tmp_path / "with-mtp")
        source = tmp_path / "with-mtp"
    data = _data()
    ref_losses, ref_norms, ref_grads, ref_weights = _train_from(str(source), RUN, str(tmp_path / "single"), data)
    world, parallel = KINDS[kind][layout]
    run = run_ranks(_train_from, world, str(source), [*RUN, *parallel], str(tmp_path / layout), data)[0]
    losses, norms, grads, weights = run
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=f"{kind} {layout}: per-step losses")
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-5, err_msg=f"{kind} {layout}: per-step gradient norms")
    _assert_same_tensors(grads, ref_grads, f"{kind} {layout}: first-step gradient")
    _assert_same_tensors(weights, ref_weights, f"{kind} {layout}: final weight")
    assert ref_losses[-1] < ref_losses[0], "the reference run must actually train"
