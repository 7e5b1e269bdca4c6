"""The Triton kernels compiled ahead of time for real NVIDIA GPUs, here, without one.

The interpreter (which the other kernel tests use) accepts what GPUs reject: `tl.dot` on blocks
under 16, dtype mixes, more shared memory than a streaming multiprocessor has. Compiling to
PTX/cubin for sm_80 (A100), sm_86 (A10/RTX 30xx, the smallest shared memory of the three) and
sm_90 (H100) catches those. It says nothing about the numbers the compiled code computes: that is
scripts/gpu-check.sh's job (docs/gpu.md).

The compiler runs in a subprocess without TRITON_INTERPRET: in a process that has run kernels
through the interpreter, triton's language functions stay patched and compiling fails.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.kernels.helpers import requires_triton

pytestmark = requires_triton

# Shared memory one block may use (opt-in maximum), bytes: CUDA C programming guide, table
# "Technical specifications per compute capability".
SHARED_LIMIT = {80: 166912, 86: 101376, 90: 232448}
TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _compile(kernel, pointers: dict[str, str], constexprs: dict, arch: int, num_warps: int = 4, num_stages: int = 3):
    """Compile `kernel` for sm_<arch>: pointer arguments typed by `pointers` (the rest i32)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = getattr(kernel, "fn", kernel)  # under TRITON_INTERPRET the decorator wraps the function differently
    params = inspect.signature(fn).parameters
    signature = {
        name: "constexpr" if "constexpr" in str(p.annotation) else pointers.get(name, "i32")
        for name, p in params.items()
    }
    assert {n for n, t in signature.items() if t == "constexpr"} == set(constexprs), "constexpr arguments changed"
    source = ASTSource(fn=JITFunction(fn), signature=signature, constexprs=constexprs)
    return triton.compile(
        source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )


def _gmm(dtype: torch.dtype, arch: int, config, gather: bool = True):
    from sparse_train.kernels import triton_kernels as tk

    t = TRITON_DTYPE[dtype]
    pointers = {"a_ptr": f"*{t}", "b_ptr": f"*{t}", "c_ptr": f"*{t}"}
    pointers |= {n: "*i64" for n in ("a_rows_ptr", "c_rows_ptr", "tile_group_ptr", "tile_row_ptr", "group_end_ptr")}
    flags = dict(GATHER_A=gather, SCATTER_C=not gather, UPCAST=False, FP32_IEEE=dtype == torch.float32)
    sizes = dict(BLOCK_M=tk.DEFAULT_BLOCK_M, **config.kwargs)
    return _compile(tk._gmm_kernel, pointers, flags | sizes, arch, config.num_warps, config.num_stages)


def _gmm_dw(dtype: torch.dtype, arch: int):
    from sparse_train.kernels import triton_kernels as tk

    t = TRITON_DTYPE[dtype]
    pointers = {"a_ptr": f"*{t}", "b_ptr": f"*{t}", "c_ptr": f"*{t}"}
    pointers |= {n: "*i64" for n in ("a_rows_ptr", "b_rows_ptr", "group_end_ptr", "counts_ptr")}
    flags = dict(GATHER_A=True, GATHER_B=False, UPCAST=False, FP32_IEEE=dtype == torch.float32)
    return _compile(tk._gmm_dw_kernel, pointers, flags | dict(BLOCK_M=64, BLOCK_K=64, BLOCK_N=64), arch)


def _rows(dtype: torch.dtype, arch: int):
    from sparse_train.kernels import triton_kernels as tk

    t = TRITON_DTYPE[dtype]
    blocks = dict(tk._ROW_BLOCKS)
    gather = _compile(
        tk._gather_rows_kernel,
        {"src_ptr": f"*{t}", "out_ptr": f"*{t}", "index_ptr": "*i64", "scale_ptr": "*fp32"},
        dict(SCALE=True, **blocks),
        arch,
    )
    scatter = _compile(
        tk._scatter_add_rows_kernel,
        {"src_ptr": f"*{t}", "out_ptr": "*fp32", "index_ptr": "*i64", "weight_ptr": "*fp32"},
        dict(WEIGHT=True, **blocks),
        arch,
    )
    return gather, scatter


def _largest_config_index() -> int:
    from sparse_train.kernels.triton_kernels import _GMM_CONFIGS

    sizes = [c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] * c.num_stages for c in _GMM_CONFIGS]
    return sizes.index(max(sizes))


def compile_all(specs: list[list]) -> list[dict]:
    """[kind, dtype name, arch, config index, gather] -> {shared bytes, MMA in the PTX}, per spec.
    Runs in the subprocess (see the module docstring)."""
    from sparse_train.kernels.triton_kernels import _GMM_CONFIGS

    results = []
    for kind, dtype_name, arch, config, gather in specs:
        dtype = getattr(torch, dtype_name)
        if kind == "gmm":
            kernels = [_gmm(dtype, arch, _GMM_CONFIGS[config], gather)]
        elif kind == "dw":
            kernels = [_gmm_dw(dtype, arch)]
        else:
            kernels = list(_rows(dtype, arch))
        results += [{"shared": k.metadata.shared, "mma": "mma" in k.asm["ptx"]} for k in kernels]
    return results


def _compile_in_subprocess(specs: list[list]) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import json, sys; from tests.kernels.test_aot_compile import compile_all; "
    code += "print(json.dumps(compile_all(json.loads(sys.argv[1]))))"
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(specs)], env=env, cwd=root, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_grouped_gemm_kernels_compile_for_sm80_within_its_shared_memory():
    """bf16, the largest autotune configuration and the weight-gradient kernel, as an A100 runs
    them (one compiler process: the whole matrix is in the slow suite)."""
    specs = [["gmm", "bfloat16", 80, _largest_config_index(), True], ["dw", "bfloat16", 80, 0, 0]]
    for kernel in _compile_in_subprocess(specs):
        assert kernel["mma"], "a bf16 tl.dot must compile to tensor-core MMA instructions"
        assert 0 < kernel["shared"] <= SHARED_LIMIT[80]


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 86, 90])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_every_kernel_and_autotune_config_compiles(arch, dtype):
    from sparse_train.kernels.triton_kernels import _GMM_CONFIGS

    gmm_specs = [["gmm", dtype, arch, i, gather] for i in range(len(_GMM_CONFIGS)) for gather in (True, False)]
    results = _compile_in_subprocess([*gmm_specs, ["dw", dtype, arch, 0, 0], ["rows", dtype, arch, 0, 0]])
    gmm, fixed = results[: len(gmm_specs)], results[len(gmm_specs) :]
    # Every configuration fits (measured: the largest, fp32 128x64 in 3 stages, takes 96 KiB of
    # sm_86's 99). Autotuning would skip one that did not, but a configuration no GPU can run is
    # a mistake; the weight-gradient kernel and the row moves have no alternative at all.
    too_big = [k["shared"] for k in gmm + fixed if k["shared"] > SHARED_LIMIT[arch]]
    assert not too_big, f"shared memory {too_big} over sm_{arch}'s {SHARED_LIMIT[arch]} bytes"
    if dtype != "float32":  # fp32 runs input_precision="ieee" unless TF32 is allowed: FMA, not MMA
        assert all(k["mma"] for k in gmm + fixed[:1])
