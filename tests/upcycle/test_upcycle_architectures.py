"""Upcycling today's dense architecture (Qwen3: per-head q/k norms, its own head width) into
Qwen3-MoE (copy, split) and into DeepSeek-V3's MoE layout (shared expert + routed experts,
sigmoid group-limited routing with the aux-free bias): each computes the dense model's logits at
step 0, and the copy into Qwen3-MoE exports as an HF Qwen3MoeForCausalLM with the same logits."""

from __future__ import annotations

import pytest
import torch

from sparse_train.cli import main
from sparse_train.models.transformer import Transformer
from sparse_train.upcycle.io import load_source
from tests.upcycle.conftest import transformers

TOKENS = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
DEEPSEEK_ROUTER = [
    "router.score=sigmoid",
    "router.num_groups=2",
    "router.group_top_k=1",
    "router.bias_update_rate=0.001",
]


def _upcycle(source, target, *args: str) -> None:
    argv = ["upcycle", "--from", str(source), "--to", str(target), "--num-experts", "4", "--top-k", "2", *args]
    assert main(argv) == 0


def _logits(run) -> tuple[torch.Tensor, object]:
    source = load_source(run)
    cfg = source.cfg
    model = Transformer(cfg.model, cfg.moe, cfg.router, cfg.fff).eval()
    model.load_state_dict(source.state, strict=True)
    with torch.no_grad():
        return model(TOKENS).logits_BSV, cfg


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture
def qwen3(hf_dir):
    path, model = hf_dir("qwen3")
    with torch.no_grad():
        return path, model(TOKENS).logits


def test_qwen3_copied_into_qwen3_moe_keeps_its_logits_and_exports_as_qwen3_moe(qwen3, tmp_path):
    path, dense_logits = qwen3
    _upcycle(path, tmp_path / "moe", "--method", "copy", "--format", "hf")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert type(reloaded).__name__ == "Qwen3MoeForCausalLM"
    with torch.no_grad():
        assert _rel(reloaded(TOKENS).logits, dense_logits) <= 1e-4


def test_qwen3_split_into_experts_keeps_its_logits(qwen3, tmp_path):
    path, dense_logits = qwen3
    _upcycle(path, tmp_path / "split", "--method", "split", "--top-k", "4")
    logits, cfg = _logits(tmp_path / "split")
    assert cfg.model.attention.qk_norm == "head" and cfg.model.head_dim == 16
    assert _rel(logits, dense_logits) <= 1e-4


def test_qwen3_into_deepseek_v3_layout_shared_and_routed_experts_keeps_its_logits(qwen3, tmp_path, capsys):
    path, dense_logits = qwen3
    extra = ["--granularity", "2", "--num-shared", "1", *(f"--set={o}" for o in DEEPSEEK_ROUTER)]
    _upcycle(path, tmp_path / "ds", "--method", "copy", *extra)
    logits, cfg = _logits(tmp_path / "ds")
    assert cfg.moe.num_shared_experts == 1 and cfg.moe.expert_hidden == 12 and cfg.router.score == "sigmoid"
    assert _rel(logits, dense_logits) <= 1e-4
    argv = ["upcycle", "--from", str(path), "--to", str(tmp_path / "ds-hf"), "--num-experts", "4", "--top-k", "2"]
    assert main([*argv, "--method", "copy", *extra, "--format", "hf"]) == 2
    assert "router.score: the Qwen3MoeForCausalLM format cannot hold it" in capsys.readouterr().err
    assert not (tmp_path / "ds-hf").exists()


def test_shared_experts_are_refused_for_split(qwen3, tmp_path, capsys):
    argv = ["upcycle", "--from", str(qwen3[0]), "--to", str(tmp_path / "x"), "--num-experts", "4", "--top-k", "4"]
    assert main([*argv, "--method", "split", "--num-shared", "1"]) == 2
    assert "--num-shared: split has no shared experts" in capsys.readouterr().err
