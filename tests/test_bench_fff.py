"""The FFF benchmark commands: inference speed (fff-infer) and the paper reproduction (fff-repro)."""

from __future__ import annotations

import json

import pytest
import torch

from sparse_train.bench import fff_infer, fff_repro
from sparse_train.cli import main

INFER_KEYS = {
    "depth",
    "batch",
    "fff_ms",
    "fff_torch_ms",
    "dense_ms",
    "speedup_vs_dense",
    "theoretical_flop_ratio",
    "leaf_mismatches",
    "max_abs_diff_vs_torch_backend",
}


def test_theoretical_flop_ratio_is_the_issue_figure_at_depth_8():
    assert fff_infer.theoretical_flop_ratio(8) == pytest.approx(204.8)


def test_fastfeedforward_peer_gets_identical_weights_and_the_difference_can_fail():
    pytest.importorskip("fastfeedforward")
    layer, _ = fff_infer.build(3, seed=0)
    peer = fff_infer.fastfeedforward_peer(layer)
    x = torch.randn(33, fff_infer.D_MODEL)
    with torch.no_grad():
        ours, _ = layer(x)
        assert float((peer(x) - ours).abs().max()) <= 1e-5
        layer.experts.w_out_EFD[0] += 0.5  # a real comparison notices a changed leaf
        changed, _ = layer(x)
        leaf0 = (peer(x) - changed).abs().amax(dim=1) > 1e-3
        assert leaf0.any()


def test_fff_infer_cli_prints_one_object_per_case(capsys):
    assert (
        main(
            [
                "bench",
                "fff-infer",
                "--json",
                "--depths",
                "2",
                "8",
                "--batches",
                "1",
                "64",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--peers",
                "",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["depth"], r["batch"]) for r in rows] == [(2, 1), (2, 64), (8, 1), (8, 64)]
    for row in rows:
        assert INFER_KEYS <= set(row)
        assert row["speedup_vs_dense"] == pytest.approx(row["dense_ms"] / row["fff_ms"], rel=1e-2)
        assert row["leaf_mismatches"] == 0 and row["max_abs_diff_vs_torch_backend"] <= 1e-4


def test_compare_backends_counts_a_leaf_the_fused_kernel_sends_elsewhere(monkeypatch):
    from sparse_train.kernels import fff_infer as kernel

    layer, _ = fff_infer.build(3, seed=0)
    original = kernel.fff_hard_forward

    def one_token_elsewhere(x, tree, experts, *, backend):
        y, leaf, counts = original(x, tree, experts, backend=backend)
        if backend == "auto":
            leaf = leaf.clone()
            leaf[0] = (leaf[0] + 1) % experts.num_experts
        return y, leaf, counts

    monkeypatch.setattr(kernel, "fff_hard_forward", one_token_elsewhere)
    with torch.no_grad():
        result = fff_infer.compare_backends(layer, torch.randn(20, fff_infer.D_MODEL))
    assert result["leaf_mismatches"] == 1
    assert result["max_abs_logit_where_leaves_differ"] > 0  # a real decision here, not a tie
    assert result["max_abs_diff_vs_torch_backend"] <= 1e-5  # over the 19 tokens on the same leaf


def test_dense_width_spends_the_soft_fff_training_flops():
    d_in, d_out, depth, leaf = 64, 10, 3, 8
    width = fff_repro.dense_width(depth, leaf, d_in, d_out)
    fff_macs = (2**depth - 1) * d_in + 2**depth * leaf * (d_in + d_out)
    assert abs(width * (d_in + d_out) - fff_macs) <= (d_in + d_out) / 2


def test_fff_repro_runs_every_variant_and_reports_mean_and_spread(capsys):
    pytest.importorskip("sklearn")
    assert main(["bench", "fff-repro", "--json", "--depths", "2", "--seeds", "2", "--epochs", "2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["variant"] for r in rows] == list(fff_repro.VARIANTS)
    for row in rows:
        assert row["seeds"] == 2 and len(row["per_seed"]) == 2
        for key in ("train_acc", "test_acc"):
            assert 0 <= row[f"{key}_mean"] <= 1 and row[f"{key}_std"] >= 0
    by_variant = {r["variant"]: r for r in rows}
    assert by_variant["fff"]["train_acc_gain_vs_fff"] == 0
    assert "leaf_entropy_mean" in by_variant["fff+lb"] and "master_blend_mean" in by_variant["fff+lb+master"]
    assert "dense_width" in by_variant["dense"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["fff-infer", "--depths", "13"], "--depths in [1, 12]"),
        (["fff-infer", "--peers", "tutel"], "unknown --peers"),
        (["fff-infer", "--batches", "0"], "--batches >= 1"),
        (["fff-repro", "--seeds", "1"], "--seeds >= 2"),
        (["fff-repro", "--depths", "0"], "--depths in [1, 20]"),
    ],
)
def test_bad_fff_bench_arguments_exit_2(argv, message, capsys):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
