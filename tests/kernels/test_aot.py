"""The Triton kernels compiled ahead of time for GPU targets, here, without a GPU.

The interpreter (which the other kernel tests use) accepts what GPUs reject: `tl.dot` on blocks
under 16, dtype mixes, more shared memory than a block may have, register pressure that spills.
sparse_train/kernels/aot.py compiles every kernel in every configuration its launcher can select
for NVIDIA and AMD targets and reads the resources; these tests fail on a kernel that does not
compile, or that exceeds its target's shared memory or spills registers (threshold 0), naming
kernel, configuration and target. The grouped GEMM's autotuner prunes, per target, the
configurations its table (sparse_train/kernels/spilling_configs.txt) lists as spilling; the tests
check that the table is exactly the set of spilling configurations: a listed one that no longer
spills fails, a line that names no case fails, and no case may have all its configurations
listed. Nothing here says what the compiled code computes (docs/gpu.md).

The compiler runs in worker processes without TRITON_INTERPRET (see aot.py): the interpreter set
by tests/conftest.py does not reach it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch

from sparse_train.cli import main
from sparse_train.kernels import aot
from tests.kernels.helpers import requires_triton

pytestmark = requires_triton


def _failures(rows: list[dict]) -> list[str]:
    """Each row that does not compile, exceeds shared memory, spills while selectable, or is
    pruned as spilling without spilling."""
    return [f"{aot.describe(row)}: {'; '.join(aot.problems(row))}" for row in rows if aot.problems(row)]


def test_every_triton_kernel_of_the_package_is_enumerated():
    """A @triton.jit kernel added to triton_kernels.py without a case here fails this test."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from sparse_train.kernels import triton_kernels as tk

    # Under the interpreter triton.jit gives InterpretedFunction, on a GPU machine JITFunction.
    kernels = {name for name, value in vars(tk).items() if isinstance(value, (JITFunction, InterpretedFunction))}
    covered = {aot._kernel_function(c.kernel).fn.__name__ for c in aot.cases()}
    assert kernels == covered


def test_the_matrix_comes_from_the_launchers_constants():
    """Every autotune configuration of the grouped GEMM (the launcher's list for the target's
    backend) appears for every dtype and target, with both index flags each way, and the weight
    gradient's GPU blocks and warps are the launcher's."""
    from sparse_train.kernels import triton_kernels as tk

    matrix = aot.cases()
    assert len({c.key for c in matrix}) == len(matrix), "two cases with one name"
    for target in aot.TARGETS:
        for config in tk.GMM_CONFIGS[target.backend]:
            options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
            for dtype in aot.DTYPES:
                same = [
                    c
                    for c in matrix
                    if c.kernel == "grouped_gemm" and c.target == target.name and c.dtype == dtype
                    if c.options == options and all(c.constexprs[k] == v for k, v in config.kwargs.items())
                ]
                flags = {(c.constexprs["GATHER_A"], c.constexprs["SCATTER_C"]) for c in same}
                assert flags == {(False, False), (False, True), (True, False), (True, True)}
    dw = [c for c in matrix if c.kernel == "grouped_gemm_dw"]
    assert len(dw) == len(aot.TARGETS) * 16  # 4 index flags; fp32 also with and without IEEE
    assert all({k: c.constexprs[k] for k in tk._DW_BLOCKS} == tk._DW_BLOCKS for c in dw)
    assert all(c.options == tk._DW_OPTIONS for c in dw)
    assert not any(c.constexprs.get("UPCAST") for c in matrix), "UPCAST is the interpreter's, never a GPU's"


def test_each_kernel_compiles_and_fits_every_target():
    """Each kernel once per target, bf16, in its configuration with the most shared memory."""
    rows = aot.compile_all(aot.representative_cases())
    assert len(rows) == 4 * len(aot.TARGETS)
    assert not _failures(rows), "\n".join(_failures(rows))
    for row in rows:
        assert row["num_warps"] > 0 and row["registers"] is not None, aot.describe(row)


def test_a_configuration_that_does_not_compile_fails_naming_kernel_configuration_and_target():
    """A planted configuration no GPU compiles (tl.dot on blocks under 16, which the interpreter
    accepts) comes back as a failure that names what failed, not as an exception."""
    good = next(c for c in aot.representative_cases(["sm_90"]) if c.kernel == "grouped_gemm")
    bad = dataclasses.replace(good, config="planted 8x8", constexprs=good.constexprs | {"BLOCK_K": 8})
    (row,) = aot.compile_all([bad], jobs=1)
    assert not row["ok"]
    message = _failures([row])[0]
    assert message.startswith("grouped_gemm [planted 8x8] bf16 on sm_90 (H100): does not compile:"), message


def test_problems_flag_shared_memory_over_the_limit_spills_and_stale_pruning():
    row = {"ok": True, "shared": 65537, "shared_limit": 65536, "spill_stores": 0, "spill_loads": None}
    assert aot.problems(row) == ["shared memory 65537 B > 65536 B per block"]
    assert aot.cannot_run(row)
    spilling = row | {"shared": 0, "spill_stores": 4, "spill_loads": 4}
    assert aot.problems(spilling) == ["spills registers (stores 4, loads 4)"]
    assert not aot.cannot_run(spilling)
    # Pruned on its target: a spill is why, and no spill means the table's line is stale.
    assert aot.problems(spilling | {"selectable": False}) == []
    stale = aot.problems(row | {"shared": 0, "selectable": False})
    assert stale == ["pruned as spilling but does not spill (remove it from spilling_configs.txt)"]


def test_bench_kernels_prints_one_json_object_per_case(capsys):
    assert main(["bench", "kernels", "--aot", "--json", "--quick", "--targets", "gfx942"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [json.loads(line) for line in out]
    assert len(rows) == 4
    required = {"kernel", "config", "dtype", "target", "shared", "shared_limit", "num_warps", "num_stages"}
    assert all(
        required | {"registers", "spill_stores", "spill_loads", "selectable", "problems"} <= set(r) for r in rows
    )
    assert {r["shared_limit"] for r in rows} == {64 * 1024}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["kernels"], "pass --aot"),
        (["kernels", "--aot", "--targets", "sm_70"], "--targets takes all or a comma list of sm_80"),
        (["kernels", "--aot", "--dtypes", "fp8"], "--dtypes takes all or a comma list of fp32"),
        (["kernels", "--aot", "--jobs", "0"], "--jobs >= 1"),
    ],
)
def test_bad_bench_kernels_arguments_exit_2_in_one_line(argv, message, capsys):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


# ---- the spilling table and the autotuner's pruning -----------------------------------------------
def test_the_spilling_table_names_cases_of_the_matrix_and_the_matrix_prunes_exactly_them():
    from sparse_train.kernels import triton_kernels as tk

    table = tk.spilling_gmm_configs()
    matrix = aot.cases()
    unknown = table - {c.key for c in matrix}
    assert not unknown, f"{tk.SPILLING_CONFIGS_FILE.name} names cases the matrix does not have: {sorted(unknown)}"
    assert {c.key for c in matrix if not c.selectable} == table
    assert all(c.selectable for c in matrix if c.kernel != "grouped_gemm")


def test_every_grouped_gemm_case_keeps_a_configuration_on_every_target():
    """For each target, dtype, output dtype and flags some configuration is not pruned (so the
    autotuner's whole-list fallback never runs for a case of the matrix)."""
    from sparse_train.kernels import triton_kernels as tk

    for target, dtype in itertools.product(aot.TARGETS, aot.DTYPES):
        configs = tk.GMM_CONFIGS[target.backend]
        for out, trans_w in itertools.product(dict.fromkeys([dtype, "fp32"]), (False, True)):
            for flags in aot._flag_sets(("GATHER_A", "SCATTER_C"), dtype):
                labelled = aot.gmm_flags(flags, trans_w)
                kept = tk.non_spilling_gmm_configs(configs, target.name, dtype, out, **labelled)
                assert kept, f"every configuration pruned on {target.name} for {dtype} -> {out} {labelled}"


def _prune(monkeypatch, target: str, dtype: torch.dtype, out_dtype: torch.dtype, *, trans_w: bool, **flags: bool):
    """The configurations the launcher's autotuner keeps, through Triton's own prune_configs, for
    the arguments grouped_gemm_triton passes, on a (fake) running `target`."""
    from sparse_train.kernels import triton_kernels as tk

    monkeypatch.setattr(tk, "running_target", lambda device: target)
    K, N = 64, 32
    x, index = torch.zeros(4, K, dtype=dtype), torch.zeros(4, dtype=torch.int64)
    w = torch.zeros(2, N, K, dtype=dtype) if trans_w else torch.zeros(2, K, N, dtype=dtype)
    out = torch.zeros(4, N, dtype=out_dtype)
    stride_bk, stride_bn = (w.stride(2), w.stride(1)) if trans_w else (w.stride(1), w.stride(2))
    args = (x, w, out, index, index, index, index, index, N, K, *x.stride(), w.stride(0), stride_bk, stride_bn)
    args += out.stride()
    kwargs = {"GATHER_A": False, "SCATTER_C": False, "FP32_IEEE": False, "UPCAST": False, "BLOCK_M": 64}
    kwargs |= {name.upper(): value for name, value in flags.items()}
    autotuned = tk._gmm_autotuned["hip" if target.startswith("gfx") else "cuda"]
    autotuned.nargs = dict(zip(autotuned.arg_names, args, strict=False))  # as Autotuner.run sets it
    assert list(autotuned.nargs)[-1] == "stride_cn"  # the launcher's positional arguments, in order
    try:
        return autotuned.prune_configs(kwargs)
    finally:
        autotuned.nargs = None


def _tiles(configs) -> list[str]:
    return [f"{c.kwargs['BLOCK_N']}x{c.kwargs['BLOCK_K']}" for c in configs]


def test_the_autotuner_prunes_the_configurations_listed_for_the_running_target(monkeypatch):
    f32, bf16 = torch.float32, torch.bfloat16
    # sm_80, exact fp32, transposed weights: 128x32, 128x64 and 64x64 spill.
    assert _tiles(_prune(monkeypatch, "sm_80", f32, f32, trans_w=True, fp32_ieee=True)) == ["64x32"]
    # ... without transposed weights 128x32 does not.
    assert _tiles(_prune(monkeypatch, "sm_80", f32, f32, trans_w=False, fp32_ieee=True)) == ["128x32", "64x32"]
    # TF32 (FP32_IEEE off) spills nowhere on sm_80; on sm_100 plain fp32 64x32 does.
    assert len(_prune(monkeypatch, "sm_80", f32, f32, trans_w=False)) == 4
    assert _tiles(_prune(monkeypatch, "sm_100", f32, f32, trans_w=False)) == ["128x32", "128x64", "64x64"]
    # sm_100: bf16 operands with an fp32 output (the backward) spill, a bf16 output does not.
    assert _tiles(_prune(monkeypatch, "sm_100", bf16, f32, trans_w=True)) == ["128x32"]
    assert len(_prune(monkeypatch, "sm_100", bf16, bf16, trans_w=True)) == 4
    # Nothing is listed for gfx942, nor for a target the table does not know: nothing changes.
    assert len(_prune(monkeypatch, "gfx942", f32, f32, trans_w=True, fp32_ieee=True)) == 4
    assert len(_prune(monkeypatch, "sm_75", f32, f32, trans_w=True, fp32_ieee=True)) == 4


def test_a_table_pruning_every_configuration_keeps_them_all_with_a_warning(monkeypatch):
    from sparse_train.kernels import triton_kernels as tk

    flags = {"trans_w": False, "gather_a": False, "scatter_c": False, "fp32_ieee": True}
    labels = [tk.gmm_config_label(c, "fp32", "fp32", **flags) for c in tk.GMM_CONFIGS["cuda"]]
    every = {f"grouped_gemm | {label} | fp32 | sm_80" for label in labels}
    monkeypatch.setattr(tk, "spilling_gmm_configs", lambda: frozenset(every))
    with pytest.warns(UserWarning, match="lists every grouped GEMM configuration as spilling on sm_80"):
        kept = _prune(monkeypatch, "sm_80", torch.float32, torch.float32, trans_w=False, fp32_ieee=True)
    assert kept == tk.GMM_CONFIGS["cuda"]
    # ... and the AOT matrix marks them all selectable, so their spills fail the tests.
    assert all(c.selectable for c in aot.cases(["sm_80"], ["fp32"]) if c.kernel == "grouped_gemm")


def test_the_autotuner_is_wired_to_the_pruning_and_keys_on_its_inputs():
    from sparse_train.kernels import triton_kernels as tk

    for autotuned in tk._gmm_autotuned.values():
        assert autotuned.early_config_prune is tk._prune_spilling_gmm_configs
        # The tensors' dtypes join every key by Triton's rule; trans_w is stride_bk == 1.
        assert {"GATHER_A", "SCATTER_C", "FP32_IEEE", "stride_bk"} <= set(autotuned.keys)


def test_the_running_target_is_named_as_the_matrix_names_targets(monkeypatch):
    from sparse_train.kernels import triton_kernels as tk

    tk._device_target.cache_clear()
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (12, 1))
    assert tk.running_target(torch.device("cuda", 0)) == "sm_121"
    tk._device_target.cache_clear()
    monkeypatch.setattr(torch.version, "hip", "6.2")
    props = type("Props", (), {"gcnArchName": "gfx942:sramecc+:xnack-"})()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    assert tk.running_target(torch.device("cuda", 0)) == "gfx942"
    tk._device_target.cache_clear()


@pytest.mark.slow
def test_every_kernel_configuration_dtype_and_target_compiles_and_fits():
    """The full matrix: 1120 compiles, ~5 min on 2 cores with an empty Triton cache. Fails on any
    spill of a selectable configuration, and on a configuration pruned as spilling that does not
    spill, so spilling_configs.txt is exactly the set of spilling configurations."""
    rows = aot.compile_all(aot.cases())
    assert not _failures(rows), "\n".join(_failures(rows))
    assert sum(not r["selectable"] for r in rows) == sum(aot.spills(r) for r in rows)
