"""The planner's inputs: the GPU table and the layouts a cluster admits for a model."""

from __future__ import annotations

import pytest

from sparse_train.config import load_config
from sparse_train.errors import UsageError
from sparse_train.plan.hardware import gpu_spec, known_gpus
from sparse_train.plan.layouts import Layout, candidate_layouts, check_layout, sequences_per_step

TINY = ["model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.n_layers=4", "moe.num_experts=8",
        "model.ffn_hidden=128", "moe.expert_hidden=64", "data.seq_len=128"]  # fmt: skip


def test_every_gpu_in_the_table_loads_and_costs_bytes_by_its_links():
    for name in known_gpus():
        spec = gpu_spec(name)
        assert spec.achievable_flops < spec.peak_tflops * 1e12
        # a GB over the NIC costs more than over NVLink, and latency counts per message
        assert spec.transfer_s(1e9, 1, inter_node=True) > spec.transfer_s(1e9, 1, inter_node=False)
        assert spec.transfer_s(0, 10, inter_node=True) == pytest.approx(10 * spec.inter_node_latency_us * 1e-6)
    h100 = gpu_spec("h100")
    assert h100.transfer_s(50e9, 0, inter_node=True) == pytest.approx(1.0)  # 50 GB/s per GPU


def test_custom_gpus_come_from_a_file_and_bad_ones_get_one_line_errors(tmp_path):
    spec = tmp_path / "gpu.yaml"
    fields = dict(gpu_spec("h100").__dict__)
    del fields["name"]
    spec.write_text("\n".join(f"{k}: {v}" for k, v in fields.items()))
    assert gpu_spec("custom", spec).memory_gb == 80
    for text, message in (
        ("peak_tflops: 100", "missing achievable_fraction"),
        ("\n".join(f"{k}: {v}" for k, v in {**fields, "memory_gb": -1}.items()), "memory_gb must be a positive"),
        ("\n".join(f"{k}: {v}" for k, v in {**fields, "hbm": 3}.items()), "unknown field hbm"),
    ):
        spec.write_text(text)
        with pytest.raises(UsageError, match=message):
            gpu_spec("custom", spec)
    with pytest.raises(UsageError, match="--gpu v100: unknown GPU; known: h100"):
        gpu_spec("v100")
    with pytest.raises(UsageError, match="--gpu custom needs --gpu-spec FILE"):
        gpu_spec("custom")


def test_the_layouts_the_trainer_accepts_and_why_the_others_fail():
    cfg = load_config(None, TINY)
    candidates = candidate_layouts(cfg, gpus=16, gpus_per_node=8, sequences=64)
    assert all(c.world == 16 and c.micro_batch * c.dp * c.grad_accum == 64 for c in candidates)
    verdicts = {c: check_layout(cfg, c) for c in candidates}
    accepted = [c for c, (run, _) in verdicts.items() if run is not None]
    assert accepted and len(accepted) < len(candidates)
    for layout in accepted:
        run = verdicts[layout][0]
        assert (run.parallel.tp, run.parallel.ep, run.train.grad_accum) == (layout.tp, layout.ep, layout.grad_accum)
    reasons = {why for _, why in verdicts.values() if why}
    assert any("parallel.tp: must divide model.n_heads (4)" in r for r in reasons)  # tp=8
    assert any("parallel.ep: must divide moe.num_experts (8)" in r for r in reasons)  # ep=16
    assert any("1F1B runs train.grad_accum" in r for r in reasons)  # pp > accumulation
    one = Layout(dp_replicate=1, dp_shard=4, ep=4, tp=2, pp=2, micro_batch=4, grad_accum=4)
    assert one in accepted
    # every block kind's recomputation; gradient sync per micro-batch only with accumulation and no pipeline
    assert {c.activation_checkpointing for c in candidates} == {"none", "all"}  # TINY: every block sparse
    synced = {(c.pp, c.grad_accum > 1) for c in candidates if c.grad_sync == "micro_batch"}
    assert synced == {(1, True)}
    mixed = load_config(None, [*TINY, "model.sparse_every_n=2"])
    modes = {c.activation_checkpointing for c in candidate_layouts(mixed, gpus=16, gpus_per_node=8, sequences=64)}
    assert modes == {"none", "all", "sparse", "dense"}


def test_a_batch_that_is_not_whole_sequences_names_the_largest_that_is():
    assert sequences_per_step(4096 * 8, 4096) == 8
    with pytest.raises(UsageError, match="not a whole number of 4096-token sequences; the largest below that is: 8192"):
        sequences_per_step(10_000, 4096)


def test_the_fast_check_accepts_exactly_what_a_composed_run_config_would():
    from sparse_train.config import ConfigError, compose_config
    from sparse_train.parallel.dims import ParallelDims

    cfg = load_config(None, TINY)
    for layout in candidate_layouts(cfg, gpus=8, gpus_per_node=8, sequences=16):
        try:
            run = compose_config(cfg.to_dict(), layout.overrides())
            ParallelDims.from_config(run.parallel, layout.world).check_model(run)
            slow = None
        except ConfigError as err:
            slow = str(err)
        fast_run, fast = check_layout(cfg, layout)
        assert fast == slow, layout
        if fast_run is not None:
            assert fast_run == run
