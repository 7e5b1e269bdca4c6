"""`sparse-train bench convert`: one JSON object per architecture, with the logits of our import
and of transformers' reload of our export equal to transformers' own, and an exact round trip."""

from __future__ import annotations

import json

import pytest

from sparse_train.cli import main

pytest.importorskip("transformers")

FIELDS = {"arch", "import_max_rel_err", "export_max_rel_err", "round_trip_exact", "params"}


def test_bench_convert_prints_errors_below_1e_4_and_an_exact_round_trip(capsys):
    # the two architectures with the most of their own: MLA + group-limited routing, and sinks +
    # sliding windows + gpt-oss experts
    assert main(["bench", "convert", "--json", "--archs", "deepseek_v3", "gpt_oss"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["arch"] for row in rows] == ["DeepseekV3ForCausalLM", "GptOssForCausalLM"]
    for row in rows:
        assert FIELDS <= set(row), row
        assert 0 <= row["import_max_rel_err"] < 1e-4 and 0 <= row["export_max_rel_err"] < 1e-4, row
        assert row["round_trip_exact"] is True and row["export_arch"] == row["arch"]
        assert row["params"] >= row["active_params"] > 0


def test_bench_convert_refuses_an_unknown_architecture(capsys):
    assert main(["bench", "convert", "--archs", "gpt2"]) == 2
    assert "bench convert: argument --archs: invalid choice: 'gpt2'" in capsys.readouterr().err
