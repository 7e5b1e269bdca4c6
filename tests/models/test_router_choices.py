"""The top-k router family: softmax or sigmoid scores, group-limited selection, a scaling factor
and aux-loss-free bias balancing. Checked against the formulas (hand-computed cases) and, on
identical logits, against Megatron-Core's own functions (a test-only oracle: scripts/ensure-venv.sh
installs megatron-core into <venv>/test-oracles with the dev extra)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from sparse_train.config import ConfigError, RouterConfig, load_config
from sparse_train.models.moe import MoELayer
from sparse_train.models.routers import group_limited_topk, select_experts

ORACLES = Path(sys.prefix) / "test-oracles"


@pytest.fixture(scope="module")
def moe_utils():
    if ORACLES.is_dir() and str(ORACLES) not in sys.path:
        sys.path.append(str(ORACLES))
    try:
        from megatron.core.transformer.moe import moe_utils
    except ImportError as err:
        pytest.skip(f"megatron-core is not installed in {ORACLES} ({err}); `make venv` with the dev extra installs it")
    return moe_utils


def _dense(weights_Tk: torch.Tensor, experts_Tk: torch.Tensor, num_experts: int) -> torch.Tensor:
    return torch.zeros(weights_Tk.shape[0], num_experts).scatter(1, experts_Tk, weights_Tk)


def test_sigmoid_scores_renormalised_and_scaled_by_hand():
    logits = torch.tensor([[0.0, 2.0, -1.0, 1.0]])
    weights, experts = select_experts(logits, RouterConfig(score="sigmoid", top_k=2, scaling_factor=2.5))
    s = torch.sigmoid(logits[0])
    assert experts.tolist() == [[1, 3]]
    torch.testing.assert_close(weights[0], 2.5 * s[[1, 3]] / s[[1, 3]].sum())


def test_groups_are_scored_by_their_top_experts_and_limit_the_choice():
    # 2 groups of 3 experts. top_k=2, group_top_k=1: each group is scored by its top 2 experts
    # (0.9 + 0.0 vs 0.5 + 0.45), so group 1 wins although expert 0 is the single best
    scores = torch.tensor([[0.9, 0.0, 0.0, 0.5, 0.45, 0.4]])
    assert sorted(group_limited_topk(scores, 2, 2, 1)[0].tolist()) == [3, 4]
    assert sorted(scores.topk(2).indices[0].tolist()) == [0, 3]  # what plain top-k would take
    # top_k=4, group_top_k=2: both groups allowed, the plain top 4
    assert sorted(group_limited_topk(scores, 4, 2, 2)[0].tolist()) == [0, 3, 4, 5]


def test_the_expert_bias_picks_experts_but_never_weights_them():
    logits = torch.tensor([[1.0, 0.9, 0.0, -1.0]])
    cfg = RouterConfig(score="sigmoid", top_k=1, renormalize=False)
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0])
    weights, experts = select_experts(logits, cfg, expert_bias_E=bias)
    assert experts.tolist() == [[3]]
    torch.testing.assert_close(weights, torch.sigmoid(logits[:, [3]]))  # the score, not score + bias


@pytest.mark.parametrize(
    ("cfg", "megatron", "biased"),
    [
        # DeepSeek-V3: sigmoid, group-limited, normalised, scaled; with and without the selection bias
        (
            dict(score="sigmoid", top_k=4, num_groups=4, group_top_k=2, scaling_factor=2.5),
            dict(score_function="sigmoid", num_groups=4, group_topk=2, scaling_factor=2.5),
            True,
        ),
        (
            dict(score="sigmoid", top_k=4, num_groups=4, group_top_k=2, scaling_factor=2.5),
            dict(score_function="sigmoid", num_groups=4, group_topk=2, scaling_factor=2.5),
            False,
        ),
        (dict(score="sigmoid", top_k=3), dict(score_function="sigmoid"), True),
        # softmax over all experts, not renormalised (Megatron's pre-softmax), with groups
        (
            dict(score="softmax", top_k=4, renormalize=False, num_groups=8, group_top_k=4),
            dict(use_pre_softmax=True, num_groups=8, group_topk=4),
            False,
        ),
        # Mixtral: top-k then softmax over the chosen (= renormalised softmax)
        (dict(score="softmax", top_k=2), dict(use_pre_softmax=False), False),
    ],
)
def test_selection_matches_megatron_core(cfg, megatron, biased, moe_utils):
    torch.manual_seed(0)
    T, E = 64, 16
    logits = torch.randn(T, E)
    bias = torch.randn(E) * 0.1 if biased else None
    weights, experts = select_experts(logits, RouterConfig(**cfg), expert_bias_E=bias)
    probs, routing_map = moe_utils.topk_routing_with_score_function(logits, cfg["top_k"], expert_bias=bias, **megatron)
    ours = torch.zeros(T, E, dtype=torch.bool).scatter(1, experts, True)
    assert torch.equal(ours, routing_map)
    torch.testing.assert_close(_dense(weights, experts, E), probs, rtol=1e-6, atol=1e-7)


def test_bias_update_matches_megatron_core(moe_utils, monkeypatch):
    # Megatron-Core sums the counts over its global groups first; here they are one process's
    monkeypatch.setattr(moe_utils.parallel_state, "get_tensor_and_data_parallel_group", lambda **kw: None)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, group=None: None)
    cfg = load_config(None, ["router.score=sigmoid", "router.bias_update_rate=0.01", "moe.num_experts=8"])
    layer = MoELayer(16, cfg.moe, cfg.router)
    layer.router.expert_bias_E.copy_(torch.randn(8))
    counts = torch.tensor([5.0, 0.0, 9.0, 3.0, 3.0, 4.0, 7.0, 1.0])  # mean 4: expert 5 stays
    expected = moe_utils.get_updated_expert_bias(counts, layer.router.expert_bias_E.clone(), 0.01)
    layer.update_expert_bias(counts)
    torch.testing.assert_close(layer.router.expert_bias_E, expected)
    before = layer.router.expert_bias_E.clone()
    layer.update_expert_bias(counts, skipped=torch.tensor(True))
    assert torch.equal(layer.router.expert_bias_E, before)  # a skipped step leaves it


def test_training_moves_the_bias_toward_balance_and_checkpoints_keep_it(tmp_path):
    from sparse_train.train import sharded
    from sparse_train.train.trainer import Trainer
    from tests.conftest import tiny_config

    cfg = tiny_config("router.score=sigmoid", "router.bias_update_rate=0.05", "router.aux_loss_coef=0")
    trainer = Trainer(cfg, tmp_path, log=lambda m: None)
    try:
        layers = [m for m in trainer.model.modules() if isinstance(m, MoELayer)]
        assert all(torch.equal(layer.router.expert_bias_E, torch.zeros(cfg.moe.num_experts)) for layer in layers)
        trainer.train_step()
        # every expert moved by exactly one step of +-rate (or 0 at the mean)
        for layer in layers:
            assert set(layer.router.expert_bias_E.abs().unique().tolist()) <= {0.0, torch.tensor(0.05).item()}
            assert layer.router.expert_bias_E.abs().sum() > 0
        assert any(name.endswith("router.expert_bias_E") for name in sharded.model_state(trainer.model))
    finally:
        trainer.close()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["router.num_groups=4"], "router.group_top_k"),
        (["router.num_groups=3", "router.group_top_k=1"], "router.num_groups"),
        (["router.num_groups=4", "router.group_top_k=8"], "router.group_top_k"),
        (["router.score=sigmoid", "router.top_k=1"], "router.renormalize"),
        (["router.bias_update_rate=-1"], "router.bias_update_rate"),
        (["router.scaling_factor=0"], "router.scaling_factor"),
        (["router.type=sinkhorn", "router.bias_update_rate=0.01"], "router.type"),
        (["router.sinkhorn_iters=0"], "router.sinkhorn_iters"),
    ],
)
def test_invalid_router_combinations_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["moe.num_experts=8", *overrides])


@pytest.mark.parametrize(
    "overrides",
    [
        ["router.score=sigmoid"],
        ["router.scaling_factor=2.5"],
        ["router.num_groups=2", "router.group_top_k=1"],
        ["router.bias_update_rate=0.01"],
    ],
)
def test_hf_export_refuses_routing_its_formats_cannot_hold(overrides):
    from sparse_train.upcycle.hf import export_arch

    cfg = load_config(None, ["moe.num_experts=8", *overrides])
    with pytest.raises(ConfigError, match=overrides[0].split("=")[0]):
        export_arch(cfg)
    assert export_arch(load_config(None, ["moe.num_experts=8"])) == "MixtralForCausalLM"


def test_collapse_warns_once_per_layer_after_the_configured_logged_steps():
    from sparse_train.train.collapse import CollapseWatch

    lines: list[str] = []
    watch = CollapseWatch(RouterConfig(collapse_share=0.5, collapse_entropy=0.25, collapse_steps=2), lines.append)
    healthy = {"moe/block0/expert_load": [0.25, 0.25, 0.3, 0.2], "loss": 1.0}
    collapsed = {"moe/block0/expert_load": [0.85, 0.05, 0.05, 0.05], "moe/block1/expert_load": [0.3, 0.2, 0.25, 0.25]}
    watch.check(1, collapsed)
    watch.check(2, healthy)  # the streak restarts
    watch.check(3, collapsed)
    assert not lines
    watch.check(4, collapsed)
    watch.check(5, collapsed)
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith("warning: router collapse in block0 at step 4: the busiest expert takes 85%")


def test_records_report_experts_per_token_and_the_bias_range(tmp_path):
    from sparse_train.train.trainer import Trainer
    from tests.conftest import tiny_config

    cfg = tiny_config("router.score=sigmoid", "router.bias_update_rate=0.05", "moe.capacity_factor=1.0")
    trainer = Trainer(cfg, tmp_path, log=lambda m: None)
    try:
        trainer.train_step()
        record = trainer.train_step()
    finally:
        trainer.close()
    assert 0 < record["moe/block0/experts_per_token"] <= cfg.router.top_k  # capacity may drop some
    assert record["moe/block0/expert_bias_range"] == pytest.approx(0.1)  # one step: +0.05 and -0.05


def test_sinkhorn_plan_and_selection_match_megatron_core(moe_utils):
    from sparse_train.models.routers import sinkhorn

    torch.manual_seed(0)
    logits = torch.randn(64, 8) * 2
    plan = sinkhorn(logits, iters=200)
    torch.testing.assert_close(plan, moe_utils.sinkhorn(logits), rtol=2e-3, atol=1e-6)  # Megatron: to tol 1e-4
    torch.testing.assert_close(plan.sum(0), torch.full((8,), 1 / 8), rtol=1e-4, atol=0)  # balanced columns
    cfg = RouterConfig(type="sinkhorn", top_k=2, renormalize=False, sinkhorn_iters=200)
    weights, experts = select_experts(logits, cfg, training=True)
    assert torch.equal(experts, moe_utils.sinkhorn(logits).topk(2, dim=1).indices)
    torch.testing.assert_close(weights, logits.softmax(-1).gather(1, experts))  # the scores weight
    _, eval_experts = select_experts(logits, cfg, training=False)
    assert torch.equal(eval_experts, logits.softmax(-1).topk(2, dim=1).indices)  # plain top-k in evaluation


def test_sinkhorn_balances_a_skewed_router():
    from sparse_train.models.routers import sinkhorn

    logits = torch.randn(256, 8)
    logits[:, 0] += 4.0  # every token prefers expert 0
    _, plain = select_experts(logits, RouterConfig(top_k=1, renormalize=False))
    _, balanced = select_experts(logits, RouterConfig(type="sinkhorn", top_k=1, renormalize=False), training=True)
    assert (plain == 0).float().mean() > 0.9
    assert (balanced == 0).float().mean() < 0.3
    assert sinkhorn(logits, 8).shape == logits.shape
