"""Proof by equivalence: every parallel layout trains the single-process model.

For each layout, N real gloo processes train the same config, seed and data as one process.
Compared, in fp32, to 1e-5 relative:
  - the loss of each of the first 5 steps;
  - the first step's gradients of every parameter, gathered into whole tensors (Adam's update
    is invariant to the gradient's scale, so a gradient off by a constant factor would leave
    losses and weights nearly unchanged: this is where such a bug shows);
  - the final parameters, gathered.
Tensors are compared by relative error in norm, ||a - b|| / ||b||: an element-wise relative
bound is ill-posed for entries near zero, and Adam makes them matter. Adam divides each
gradient entry by its own running magnitude, so an entry that lands within fp32 summation
noise of zero (1e-8 against entries of 1e-2, seen on embedding rows) turns a 1e-7 relative
gradient difference into a visible one in the update. AdamW's epsilon is 1e-6 here (not 1e-8)
to damp that amplification; the gradients themselves agree to ~4e-7 in every layout.

The global batch is the same in every layout (`train.batch_size` sequences per micro-batch,
split over the data-parallel ranks), and the balancing loss uses the global_batch scope,
which is the same on any number of ranks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_train.config import Config
from sparse_train.data.dataset import TokenData
from sparse_train.launch.local import run_ranks
from tests.conftest import tiny_config

STEPS = 5
BASE = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.ffn_hidden=64",
    "moe.num_experts=4",
    "moe.expert_hidden=32",
    "moe.kernel_backend=torch",
    "router.top_k=2",
    "router.balance_scope=global_batch",
    "train.batch_size=4",
    "train.grad_accum=2",
    f"train.steps={STEPS}",
    "optimizer.warmup_steps=1",
    "optimizer.eps=1e-6",
    "checkpoint.every=0",
    "checkpoint.save_final=false",
]

FFF = [
    "model.ffn=fff",
    "fff.depth=2",
    "fff.leaf_width=16",
    "fff.balance_scope=global_batch",
    "fff.hardening_coef=0.01",
    "fff.kernel_backend=torch",
]

# DeepSeek-V3's routing: sigmoid scores, group-limited, scaled, with aux-loss-free bias balancing
DEEPSEEK_ROUTER = ["router.score=sigmoid", "router.num_groups=2", "router.group_top_k=1", "router.scaling_factor=2.0",
                   "router.bias_update_rate=0.01"]  # fmt: skip

EXPERT_CHOICE = ["router.type=expert_choice", "moe.capacity_factor=1.5"]
# Each sparsity objective on its own: with both at once, fp32 reduction-order differences grow
# ~10x per step here (the router's RMSNorm is scale-invariant, so tokens whose activations are all
# small get gradients ~1/rms); step 5's gradient norm was 4e-4 apart (docs/decisions.md §51)
RELU = ["router.type=relu"]
ZERO_COMPUTATION = ["moe.zero_experts=1", "moe.copy_experts=1", "moe.constant_experts=1", "router.top_k=3",
                    "moe.gating_residual=true"]  # fmt: skip
SELECTIVE_SINKHORN = ["router.type=selective_sinkhorn", "router.sinkhorn_fraction=0.5"]
# gpt-oss's experts: biases (the down bias added once, after the TP sum) and the clamped
# activation, with a limit small enough that the clamps bind at initialisation; a router bias
GPT_OSS_MOE = ["moe.expert_activation=gpt_oss", "moe.expert_limit=1.0", "moe.expert_bias=true", "router.bias=true"]

LAYOUTS = {
    # name: (processes, parallel overrides, extra model overrides). A router variant runs under
    # tp2-ep2, which holds ep=2 over the data-parallel ranks as ep2 does, with TP on top
    "ep2-dp_replicate2": (2, ["parallel.dp_replicate=2", "parallel.dp_shard=1", "parallel.ep=2"], []),
    "ep2-dp_shard2": (2, ["parallel.ep=2"], []),
    "ep4": (4, ["parallel.ep=4"], []),
    "tp2": (2, ["parallel.tp=2"], ["model.sparse_layers=[1]"]),  # block 0 a dense SwiGLU, block 1 MoE
    "pp2": (2, ["parallel.pp=2"], []),
    "pp2-no-moe-on-first-stage": (2, ["parallel.pp=2"], ["model.sparse_layers=[1]"]),
    "ep2-dp_shard2-shared-expert": (2, ["parallel.dp_shard=2", "parallel.ep=2"], ["moe.num_shared_experts=1"]),
    "tp2-ep2": (4, ["parallel.tp=2", "parallel.ep=2"], ["moe.num_shared_experts=1"]),
    "pp2-ep2": (4, ["parallel.pp=2", "parallel.ep=2"], []),
    "hsdp2x2-ep2": (4, ["parallel.dp_replicate=2", "parallel.dp_shard=2", "parallel.ep=2"], []),
    "tp2-ep2-deepseek-router": (4, ["parallel.tp=2", "parallel.ep=2"], DEEPSEEK_ROUTER),
    # Sinkhorn balances the whole data-parallel batch: the same plan as one process
    "tp2-ep2-sinkhorn": (4, ["parallel.tp=2", "parallel.ep=2"], ["router.type=sinkhorn", "router.renormalize=false"]),
    # Variable experts per token: per-sequence expert choice, BlockFFN's ReLU router with its
    # sparsity objectives; and the frozen random router (no gradient to the router)
    "tp2-ep2-expert-choice": (4, ["parallel.tp=2", "parallel.ep=2"], EXPERT_CHOICE),
    "pp2-ep2-expert-choice": (4, ["parallel.pp=2", "parallel.ep=2"], EXPERT_CHOICE),
    "ep2-relu-tls": (2, ["parallel.ep=2"], [*RELU, "router.tls_coef=0.01"]),
    "tp2-ep2-relu-cls": (4, ["parallel.tp=2", "parallel.ep=2"], [*RELU, "router.cls_coef=0.01", "router.chunk_size=4"]),
    "ep2-random": (2, ["parallel.ep=2"], ["router.type=random"]),
    # MoE++: zero-computation experts computed on every rank, never dispatched; gating residuals
    # (under pp, the first block's logits cross to the second stage beside the hidden state)
    "tp2-ep2-zero-computation-experts": (4, ["parallel.tp=2", "parallel.ep=2"], ZERO_COMPUTATION),
    # the transport plan's gradients cross the data-parallel ranks on steps 1 and 3
    "ep2-selective-sinkhorn": (2, ["parallel.ep=2"], SELECTIVE_SINKHORN),
    "ep2-gpt-oss-moe": (2, ["parallel.ep=2"], GPT_OSS_MOE),
    "tp2-gpt-oss-moe": (2, ["parallel.tp=2"], GPT_OSS_MOE),
    "tp2-ep2-gpt-oss-moe": (4, ["parallel.tp=2", "parallel.ep=2"], GPT_OSS_MOE),
    "ep2-edp2-gpt-oss-moe": (4, ["parallel.ep=2"], GPT_OSS_MOE),  # each expert slice FSDP-sharded over 2 ranks
    # 3 local experts over 2 edp ranks: FSDP shards the experts on another dimension (parallel.data)
    "ep2-edp2-odd-local-experts": (4, ["parallel.ep=2"], ["moe.num_experts=6"]),
    # recomputed blocks under FSDP, EP and TP: the all-to-alls and TP collectives run again in the backward
    "tp2-ep2-recompute": (4, ["parallel.tp=2", "parallel.ep=2"], ["train.activation_checkpointing=all"]),
    # FSDP reduce-scatters after every micro-batch instead of once per step
    "ep2-grad-sync-every-micro-batch": (2, ["parallel.ep=2", "parallel.grad_sync=micro_batch"], ["train.grad_accum=2"]),
    # FFF trees: leaves sharded over EP ranks like experts, node neurons replicated
    "fff-hard-ep2": (2, ["parallel.ep=2"], [*FFF, "fff.mode=hard", "fff.master_leaf=true"]),
    "fff-topk-ep2-gelu": (2, ["parallel.ep=2"], [*FFF, "fff.mode=topk_paths", "fff.leaf_activation=gelu"]),
    "fff-soft-tp2-ep2": (4, ["parallel.tp=2", "parallel.ep=2"], [*FFF, "fff.mode=soft", "fff.master_leaf=true"]),
    "fff-hard-pp2": (2, ["parallel.pp=2"], [*FFF, "fff.mode=hard"]),
}
FAST = {
    "ep2-dp_shard2",
    "tp2",
    "ep2-gpt-oss-moe",
    "tp2-gpt-oss-moe",
}  # the rest, pp and FFF included, in the slow suite (`make test` < 4 min)


def _data() -> TokenData:
    rng = np.random.default_rng(0)
    # 32 of the 256 byte values: a unigram the first steps visibly learn (loss falls from ln 256 toward ln 32)
    return TokenData(
        rng.integers(0, 32, 30_000).astype(np.uint16), rng.integers(0, 32, 4_000).astype(np.uint16), "random tokens"
    )


def _train(cfg: Config, run_dir: str, data: TokenData):
    """(per-step losses, per-step gradient norms, first step's gradients, final weights), all whole
    tensors; on rank 0."""
    from sparse_train.train.trainer import Trainer

    return train_steps(Trainer(cfg, Path(run_dir), data=data, log=lambda msg: None))


def train_steps(trainer) -> tuple | None:
    """STEPS steps of a built trainer: what `_train` returns."""
    first_grads: dict[str, torch.Tensor] = {}

    def record_first_gradients(optimizer, args, kwargs) -> None:  # what the optimizer applies (after clipping)
        if not first_grads:
            first_grads.update(trainer.engine.full_gradients())

    trainer.optimizer.register_step_pre_hook(record_first_gradients)
    records = [trainer.train_step() for _ in range(STEPS)]
    weights = trainer.engine.full_state_dict()
    trainer.metrics.close()
    losses, norms = [r["loss"] for r in records], [r["grad_norm"] for r in records]
    return (losses, norms, first_grads, weights) if trainer.is_main else None


def _assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(got) == sorted(want), f"{what}: different parameter names"
    for name, ref in want.items():
        err = float((got[name].double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))
        assert err <= 1e-5, f"{what} of {name}: relative error {err:.2e} > 1e-5"


def _config(model_extra: list[str], parallel: list[str]) -> Config:
    return tiny_config(*BASE, *model_extra, *parallel)


@pytest.mark.parametrize("layout", [pytest.param(n, marks=[] if n in FAST else [pytest.mark.slow]) for n in LAYOUTS])
def test_layout_reproduces_single_process_losses_and_parameters(layout, tmp_path):
    world, parallel, model_extra = LAYOUTS[layout]
    data = _data()
    ref_losses, ref_norms, ref_grads, ref_weights = _train(_config(model_extra, []), str(tmp_path / "single"), data)
    run = run_ranks(_train, world, _config(model_extra, parallel), str(tmp_path / layout), data)[0]
    losses, norms, grads, weights = run
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=f"{layout}: per-step losses")
    # the norm clipping uses (Adam would hide a gradient off by a constant factor, not a wrong clip)
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-5, err_msg=f"{layout}: per-step gradient norms")
    _assert_same_tensors(grads, ref_grads, f"{layout}: first-step gradient")
    _assert_same_tensors(weights, ref_weights, f"{layout}: final weight")
    assert ref_losses[-1] < ref_losses[0], "the reference run must actually train"
