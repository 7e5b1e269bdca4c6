"""The memory prediction (train/memory.py), the trainer's warning before the first step, and an
out-of-memory step as one line naming the layout and the measured peak."""

from __future__ import annotations

import pytest
import torch

from sparse_train.config import load_config
from sparse_train.errors import OutOfMemory
from sparse_train.models.transformer import Transformer
from sparse_train.train import memory
from sparse_train.train.loss import aux_loss_names, total_loss
from sparse_train.train.trainer import Trainer
from tests.conftest import tiny_config

BASE = ["model.vocab_size=260", "model.max_seq_len=64", "data.seq_len=64", "train.batch_size=4"]
BASE += ["moe.kernel_backend=torch", "fff.kernel_backend=torch"]
MODELS = {
    "moe": ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "moe.num_experts=8", "moe.expert_hidden=128"],
    "dense": ["model.ffn=dense", "model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.ffn_hidden=192"],
    "moe-shared-gqa-every2": [
        "model.d_model=64",
        "model.n_layers=4",
        "model.n_heads=4",
        "model.n_kv_heads=2",
        "model.sparse_every_n=2",
        "moe.num_experts=4",
        "moe.expert_hidden=64",
        "moe.num_shared_experts=1",
    ],
    "fff-hard": ["model.ffn=fff", "model.d_model=64", "model.n_layers=2", "model.n_heads=2", "fff.depth=3"],
    "fff-soft": ["model.ffn=fff", "model.d_model=64", "model.n_layers=2", "fff.depth=2", "fff.mode=soft"],
    "fff-topk-gelu-master": [
        "model.ffn=fff",
        "model.d_model=64",
        "model.n_layers=2",
        "fff.depth=3",
        "fff.mode=topk_paths",
        "fff.leaf_activation=gelu",
        "fff.master_leaf=true",
    ],
}


def _saved_bytes(loss: torch.Tensor, exclude: set[int]) -> int:
    """Bytes of the distinct storages the autograd graph of `loss` holds for its backward,
    leaving out the storages in `exclude` (parameters and buffers)."""
    seen: dict[int, int] = {}
    stack, visited = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        tensors = []
        for attr in dir(node):
            if attr.startswith("_saved_"):
                try:
                    value = getattr(node, attr)
                except RuntimeError:  # freed or not a tensor
                    continue
                values = value if isinstance(value, (tuple, list)) else [value]
                tensors += [v for v in values if isinstance(v, torch.Tensor)]
        if hasattr(node, "saved_tensors"):  # custom autograd functions and ops
            tensors += [t for t in node.saved_tensors if isinstance(t, torch.Tensor)]
        for t in tensors:
            storage = t.untyped_storage()
            if storage.data_ptr() not in exclude:
                seen[storage.data_ptr()] = storage.nbytes()
        stack += [fn for fn, _ in node.next_functions]
    return sum(seen.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("model", list(MODELS))
def test_activation_estimate_matches_what_autograd_saves(model, precision):
    cfg = load_config(None, [*BASE, *MODELS[model], f"train.precision={precision}"])
    net = Transformer(cfg.model, cfg.moe, cfg.router, cfg.fff)
    tokens = torch.randint(0, 260, (cfg.train.batch_size, cfg.data.seq_len))
    exclude = {t.untyped_storage().data_ptr() for t in [*net.parameters(), *net.buffers()]}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with autocast:
        output = net(tokens)
    loss = total_loss(output, tokens, aux_loss_names(cfg)).loss
    saved = _saved_bytes(loss, exclude)
    predicted = memory.activation_bytes(net, cfg, None, saved_only=True)
    assert saved > 0
    assert predicted == pytest.approx(saved, rel=0.1), f"{model} {precision}: {predicted} vs {saved} bytes"


def test_prediction_counts_this_ranks_parameters_gradients_and_adamw_state(tmp_path):
    trainer = Trainer(tiny_config("train.steps=1"), tmp_path)
    p = trainer.predict_memory()
    param_bytes = sum(q.numel() * q.element_size() for q in trainer.model.parameters())
    assert p.params_mb == p.grads_mb == pytest.approx(param_bytes / memory.MB)
    assert p.fsdp_buffers_mb == 0  # one process: no FSDP
    trainer.train_step()
    moments = [s[k] for s in trainer.optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")]
    assert p.optimizer_mb == pytest.approx(memory.local_bytes(moments) / memory.MB)
    assert p.baseline_mb > 50  # the process itself (python, torch, data): resident on CPU
    assert p.step_mb == pytest.approx(p.baseline_mb + p.state_mb + p.activations_mb)


def test_activations_scale_with_the_batch_and_the_micro_batches_a_pipeline_stage_holds():
    cfg = load_config(None, [*BASE, *MODELS["moe"]])
    net = Transformer(cfg.model, cfg.moe, cfg.router, cfg.fff)
    one = memory.activation_bytes(net, cfg, None)
    double = load_config(None, [*BASE, *MODELS["moe"], "train.batch_size=8"])
    assert memory.activation_bytes(net, double, None) == 2 * one
    from sparse_train.parallel.dims import ParallelDims

    pp = load_config(None, [*BASE, *MODELS["moe"], "train.grad_accum=4"])
    dims = ParallelDims(dp_replicate=1, dp_shard=1, ep=1, tp=1, pp=2, world_size=2)
    # 1F1B: the first of two stages holds two micro-batches at once, the last one
    assert memory.activation_bytes(net, pp, dims, pp_rank=0) == 2 * memory.activation_bytes(net, pp, dims, pp_rank=1)


def test_a_run_predicted_not_to_fit_warns_once_with_the_numbers_before_the_first_step(tmp_path, monkeypatch):
    lines: list[str] = []
    trainer = Trainer(tiny_config("train.steps=2", "train.eval_every=0"), tmp_path, log=lines.append)
    monkeypatch.setattr(memory, "_mem_available_mb", lambda: 1.0)  # 1 MB of RAM left on this machine
    steps_seen = []
    train_step = trainer.train_step
    monkeypatch.setattr(trainer, "train_step", lambda **kw: (steps_seen.append(len(lines)), train_step(**kw))[1])
    trainer.fit()
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert steps_seen[0] == lines.index(warnings[0]) + 1  # logged before the first step ran
    predicted = trainer.memory_prediction.step_mb
    assert f"predicted peak memory {predicted:,.0f} MB per rank" in warnings[0]
    assert "one process" in warnings[0] and "parameters" in warnings[0] and "activations" in warnings[0]


def test_a_run_that_fits_does_not_warn(tmp_path, monkeypatch):
    lines: list[str] = []
    monkeypatch.setattr(memory, "_mem_available_mb", lambda: 1e6)
    Trainer(tiny_config("train.steps=1"), tmp_path, log=lines.append).fit()
    assert not [line for line in lines if line.startswith("warning:")]


CPU_OOM = (
    "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
    "allocate 35184372088832 bytes. Error code 12 (Cannot allocate memory)"
)  # what torch 2.13 raises for torch.empty(2**45, dtype=torch.uint8) on this machine


@pytest.mark.parametrize("error", [RuntimeError(CPU_OOM), torch.OutOfMemoryError("CUDA out of memory.")])
def test_out_of_memory_in_a_step_is_one_line_naming_the_layout_and_the_peak(tmp_path, monkeypatch, error):
    trainer = Trainer(tiny_config("train.steps=3"), tmp_path)

    def exhausted(*args, **kwargs):
        raise error

    monkeypatch.setattr(trainer.engine, "forward_backward", exhausted)
    with pytest.raises(OutOfMemory) as caught:
        trainer.fit()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("out of memory in step 1 on rank 0 (one process): peak ")
    assert f"{trainer.memory_prediction.step_mb:,.0f} MB predicted" in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_other_runtime_errors_in_a_step_pass_through(tmp_path, monkeypatch):
    trainer = Trainer(tiny_config("train.steps=1"), tmp_path)
    monkeypatch.setattr(trainer.engine, "forward_backward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("bad")))
    with pytest.raises(RuntimeError, match="^bad$"):
        trainer.train_step()


def test_the_cli_prints_an_out_of_memory_step_as_one_error_line(tmp_path, monkeypatch, capsys):
    from sparse_train.cli import main
    from sparse_train.train.engine import Engine
    from tests.conftest import tiny_overrides

    def exhausted(self, *args, **kwargs):
        raise RuntimeError(CPU_OOM)

    monkeypatch.setattr(Engine, "forward_backward", exhausted)
    argv = ["train", "--run-dir", str(tmp_path / "run")]
    for override in tiny_overrides("train.steps=2"):
        argv += ["--set", override]
    assert main(argv) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err[-1].startswith("error: out of memory in step 1 on rank 0 (one process): peak ")
