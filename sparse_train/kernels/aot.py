"""Every Triton kernel of the package compiled ahead of time for real GPUs, without one.

`triton.compile` builds PTX and cubin for NVIDIA targets and a code object for AMD ones on a
machine with no GPU. Compiling every kernel in every configuration its launcher can select
catches what the interpreter (which runs the kernels in the tests) accepts and GPUs reject, and
reports each compiled kernel's resources: shared memory against the target's per-block limit,
registers and spills. It says nothing about the numbers the compiled code computes, nor its speed.

What is compiled comes from the launchers in triton_kernels.py: their autotune lists and block
constants are imported, not copied, so a configuration added there is compiled here too. The
grouped GEMM's autotuner prunes, per target, the configurations listed as spilling there
(triton_kernels.SPILLING_CONFIGS_FILE); the matrix still compiles them, marked not `selectable`,
so the table is checked against what the compiler reports (`problems`).

The compiler runs in worker processes started without TRITON_INTERPRET. Under the interpreter,
triton.language's own jit helpers (`tl.zeros`, ...) are interpreted functions: the compiler calls
them as Python, which patches triton.language for good and breaks every later compile (measured
with Triton 3.9). The workers also put both cores to use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import itertools
import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

KIB = 1024


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # sm_80, gfx942
    gpu: str  # a GPU of this architecture, for readers
    backend: str  # "cuda" or "hip"
    arch: int | str
    warp_size: int
    shared_limit: int


# shared_limit: bytes one block may use. NVIDIA: the opt-in maximum of the CUDA C++ Programming
# Guide's "Technical specifications per compute capability" (1 KiB of each SM's 164/228 KiB is
# reserved per block); AMD: LDS per workgroup, 64 KiB on CDNA3.
TARGETS = (
    Target("sm_80", "A100", "cuda", 80, 32, 163 * KIB),
    Target("sm_90", "H100", "cuda", 90, 32, 227 * KIB),
    Target("sm_100", "B200", "cuda", 100, 32, 227 * KIB),
    # The newest NVIDIA architecture Triton 3.9 compiles for (sm_130 fails in its passes); compute
    # capability 12.x (RTX 50xx, RTX PRO 6000, GB10) has 99 KiB per block, the smallest here.
    Target("sm_121", "GB10", "cuda", 121, 32, 99 * KIB),
    Target("gfx942", "MI300X", "hip", "gfx942", 64, 64 * KIB),
)
TARGETS_BY_NAME = {t.name: t for t in TARGETS}

TRITON_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
DTYPES = tuple(TRITON_DTYPES.values())  # every dtype the launchers accept (one for all operands)


@dataclasses.dataclass(frozen=True)
class Case:
    """One compile: a kernel in one configuration, for one operand dtype and one target."""

    kernel: str
    config: str  # the launcher's choice, readable: "autotune 128x32 w4 s3 gather_a trans_w"
    dtype: str
    target: str
    pointers: dict[str, str] = dataclasses.field(compare=False, hash=False)  # pointer argument -> "*fp32", ...
    scalars: dict[str, int] = dataclasses.field(compare=False, hash=False)  # integer arguments of a typical launch
    constexprs: dict[str, Any] = dataclasses.field(compare=False, hash=False)
    options: dict[str, int] = dataclasses.field(compare=False, hash=False)  # num_warps/num_stages; {} = defaults
    # False: the launcher's autotuner prunes this configuration on this target (listed as spilling)
    selectable: bool = dataclasses.field(default=True, compare=False, hash=False)

    @property
    def key(self) -> str:
        return f"{self.kernel} | {self.config} | {self.dtype} | {self.target}"


# ---- the enumeration, from the launchers' own constants -----------------------------------------
# A launch specialises its integer arguments by value (1 becomes a constant, multiples of 16 are
# marked divisible) and its pointers by alignment, and that changes the code (vectorised loads,
# registers). The cases compile what a typical MoE launch gets: contiguous tensors from torch's
# allocator, widths that are multiples of 16, and a row count that is not.
K, N, G, ROWS = 1024, 2048, 8, 4099


def _flag_sets(names: tuple[str, str], dtype: str) -> Iterator[dict[str, bool]]:
    """The launchers' flags: both index options each way; FP32_IEEE for fp32 operands depends on
    torch's allow_tf32 (both are selectable); UPCAST is interpreter-only, so False on a GPU."""
    ieee = (True, False) if dtype == "fp32" else (False,)
    for a, b, exact in itertools.product((False, True), (False, True), ieee):
        yield {names[0]: a, names[1]: b, "UPCAST": False, "FP32_IEEE": exact}


def _flag_label(flags: dict[str, bool]) -> str:
    on = [name.lower() for name, value in flags.items() if value and name != "UPCAST"]
    return " ".join(on) if on else "plain"


def _blocks_label(blocks: dict[str, int], names: tuple[str, ...]) -> str:
    return "x".join(str(blocks[n]) for n in names)


# Row indices, tile schedules and group offsets are int64 in every launcher (tile_schedule, the
# routing's argsort, counts.to(torch.int64)).
_GMM_INDEX_POINTERS = dict.fromkeys(
    ["a_rows_ptr", "c_rows_ptr", "tile_group_ptr", "tile_row_ptr", "group_end_ptr"], "*i64"
)
_DW_INDEX_POINTERS = dict.fromkeys(["a_rows_ptr", "b_rows_ptr", "group_end_ptr", "counts_ptr"], "*i64")


def _gmm_scalars(trans_w: bool) -> dict[str, int]:
    """x [rows, K] @ w[g]: w is [G, K, N], or [G, N, K] read transposed (trans_w, the backward's dX)."""
    stride_bk, stride_bn = (1, K) if trans_w else (N, 1)
    weights = {"stride_bg": K * N, "stride_bk": stride_bk, "stride_bn": stride_bn}
    return {"N": N, "K": K, "stride_am": K, "stride_ak": 1, **weights, "stride_cm": N, "stride_cn": 1}


def gmm_flags(flags: dict[str, bool], trans_w: bool) -> dict[str, bool]:
    """A case's flags as triton_kernels' labels and pruning take them."""
    names = ("GATHER_A", "SCATTER_C", "FP32_IEEE")
    return {name.lower(): flags[name] for name in names} | {"trans_w": trans_w}


def _gmm_cases(dtype: str, target: str) -> Iterator[Case]:
    """Every autotune configuration of the launcher's list for the target's backend (a caller's
    block_sizes skip autotuning: only the interpreter tests pass them), each marked selectable or
    not by the autotuner's own pruning on that target. Where the pruning would leave nothing the
    autotuner keeps every configuration, and so do these cases: their spills then fail the tests."""
    from sparse_train.kernels import triton_kernels as tk

    configs = tk.GMM_CONFIGS[TARGETS_BY_NAME[target].backend]
    # Backward GEMMs of 16-bit operands may write fp32 (out_dtype), others the operands' dtype.
    outputs = dict.fromkeys([dtype, "fp32"])
    choices = itertools.product(outputs, (False, True), _flag_sets(("GATHER_A", "SCATTER_C"), dtype))
    for out, trans_w, flags in choices:
        labelled = gmm_flags(flags, trans_w)
        selectable = tk.non_spilling_gmm_configs(configs, target, dtype, out, **labelled) or configs
        for config in configs:
            pointers = {"a_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "c_ptr": f"*{out}", **_GMM_INDEX_POINTERS}
            label = tk.gmm_config_label(config, dtype, out, **labelled)
            constexprs = {**flags, "BLOCK_M": tk.DEFAULT_BLOCK_M, **config.kwargs}
            options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
            scalars = _gmm_scalars(trans_w)
            yield Case(
                "grouped_gemm", label, dtype, target, pointers, scalars, constexprs, options, config in selectable
            )


def _gmm_dw_cases(dtype: str, target: str) -> Iterator[Case]:
    from sparse_train.kernels import triton_kernels as tk

    scalars = {"K": K, "N": N, "stride_am": K, "stride_ak": 1, "stride_bm": N, "stride_bn": 1}
    scalars |= {"stride_cg": K * N, "stride_ck": N, "stride_cn": 1}
    for flags in _flag_sets(("GATHER_A", "GATHER_B"), dtype):
        pointers = {"a_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "c_ptr": f"*{dtype}", **_DW_INDEX_POINTERS}
        blocks = _blocks_label(tk._DW_BLOCKS, ("BLOCK_M", "BLOCK_K", "BLOCK_N"))
        config = f"{blocks} w{tk._DW_OPTIONS['num_warps']} {_flag_label(flags)}"
        constexprs = {**flags, **tk._DW_BLOCKS}
        yield Case("grouped_gemm_dw", config, dtype, target, pointers, scalars, constexprs, dict(tk._DW_OPTIONS))


def _row_cases(dtype: str, target: str) -> Iterator[Case]:
    from sparse_train.kernels import triton_kernels as tk

    scalars = {"M": ROWS, "D": K, "stride_s": K, "stride_o": K}
    # Without scale/weight the launchers pass the int64 index tensor in that pointer's place;
    # with one, the kernels upcast whatever float dtype it has (the operands' or fp32).
    scales = {"none": "i64", **{f"scale {d}": d for d in dict.fromkeys([dtype, "fp32"])}}
    for label, scale in scales.items():
        on = scale != "i64"
        gather = {"src_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "index_ptr": "*i64", "scale_ptr": f"*{scale}"}
        yield Case("gather_rows", label, dtype, target, gather, scalars, {"SCALE": on, **tk._ROW_BLOCKS}, {})
        scatter = {"src_ptr": f"*{dtype}", "out_ptr": "*fp32", "index_ptr": "*i64", "weight_ptr": f"*{scale}"}
        weight = label.replace("scale", "weight")
        yield Case("scatter_add_rows", weight, dtype, target, scatter, scalars, {"WEIGHT": on, **tk._ROW_BLOCKS}, {})


KERNEL_CASES: dict[str, Callable[[str, str], Iterator[Case]]] = {
    "grouped_gemm": _gmm_cases,
    "grouped_gemm_dw": _gmm_dw_cases,
    "rows": _row_cases,
}


def cases(targets: Iterable[str] | None = None, dtypes: Iterable[str] = DTYPES) -> list[Case]:
    """The full matrix: every kernel x configuration x dtype x target."""
    names = list(targets) if targets is not None else [t.name for t in TARGETS]
    return [c for t in names for d in dtypes for make in KERNEL_CASES.values() for c in make(d, t)]


def representative_cases(targets: Iterable[str] | None = None) -> list[Case]:
    """Each kernel once per target, in bf16 (the training dtype), in its selectable configuration
    with the most shared memory (fp32 would be larger still; the full matrix has it)."""
    chosen: dict[tuple[str, str], Case] = {}
    for case in cases(targets, dtypes=("bf16",)):
        if not case.selectable:
            continue
        best = chosen.get((case.kernel, case.target))
        if best is None or _shared_estimate(case) > _shared_estimate(best):
            chosen[(case.kernel, case.target)] = case
    return list(chosen.values())


def _shared_estimate(case: Case) -> int:
    """Tile elements x pipeline stages: only to pick the biggest configuration of a kernel."""
    c = case.constexprs
    tiles = c.get("BLOCK_K", 1) * (c.get("BLOCK_M", 1) + c.get("BLOCK_N", 1))
    return tiles * case.options.get("num_stages", 3)


# ---- compiling one case (in a worker) ------------------------------------------------------------
def _kernel_function(name: str) -> Any:
    """The kernel's JITFunction (under the interpreter, triton.jit returns another wrapper)."""
    from triton.runtime.jit import JITFunction

    from sparse_train.kernels import triton_kernels as tk

    attr = {"grouped_gemm": "_gmm_kernel", "grouped_gemm_dw": "_gmm_dw_kernel"}.get(name, f"_{name}_kernel")
    fn = getattr(tk, attr)
    return fn if isinstance(fn, JITFunction) else JITFunction(fn.fn)


def _specialised(fn: Any, case: Case) -> tuple[dict[str, str], dict[Any, Any], dict[tuple[int, ...], Any]]:
    """Signature, constants and attributes as a launch with `case`'s arguments gets them, by
    Triton's own specialisation rule (pointers: 16-byte aligned, as torch allocates)."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    names = list(inspect.signature(fn.fn).parameters)
    expected = set(names) - set(case.constexprs)
    if expected != set(case.pointers) | set(case.scalars):
        raise ValueError(f"{case.kernel}: arguments {sorted(expected)} != the case's")
    signature: dict[str, str] = {}
    constexprs: dict[Any, Any] = dict(case.constexprs)
    attrs: dict[tuple[int, ...], Any] = {}
    for index, name in enumerate(names):
        if name in case.constexprs:
            signature[name] = "constexpr"
            continue
        if name in case.pointers:
            kind, spec = case.pointers[name], "D"
        else:
            kind, spec = native_specialize_impl(BaseBackend, case.scalars[name], False, True, True)
        signature[name] = kind
        if kind == "constexpr":  # an integer equal to 1
            constexprs[name] = spec
        elif spec:
            attrs[(index,)] = BaseBackend.parse_attr(spec)
    return signature, constexprs, attrs


def compile_case(case: Case) -> dict[str, Any]:
    """Compile one case and read its resources; a failure is returned, not raised."""
    target = TARGETS_BY_NAME[case.target]
    start = time.perf_counter()
    row: dict[str, Any] = {"kernel": case.kernel, "config": case.config, "dtype": case.dtype, "target": case.target}
    row["selectable"] = case.selectable
    row |= {"gpu": target.gpu, "shared_limit": target.shared_limit}
    try:
        compiled, ptxas_log = _compile(case, target)
    except Exception as err:  # noqa: BLE001 - the failing compile is the result
        return row | {"ok": False, "error": _one_line(err), "seconds": round(time.perf_counter() - start, 2)}
    meta = compiled.metadata
    row |= {"ok": True, "shared": meta.shared, "num_warps": meta.num_warps, "num_stages": meta.num_stages}
    if target.backend == "cuda":
        row |= _nvidia_resources(ptxas_log or _ptxas_log(compiled, target))
    else:
        row |= _amd_resources(compiled.asm["amdgcn"])
    return row | {"seconds": round(time.perf_counter() - start, 2)}


def _compile(case: Case, target: Target) -> tuple[Any, str]:
    """The compiled kernel and, when ptxas ran (not a cache hit), its `-v` log: Triton runs ptxas
    with -v and prints the log only when asked (knobs.nvidia.dump_ptxas_log)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernel_function(case.kernel)
    signature, constexprs, attrs = _specialised(fn, case)
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    gpu = GPUTarget(target.backend, target.arch, target.warp_size)
    captured = io.StringIO()
    with triton.knobs.nvidia.scope(), contextlib.redirect_stdout(captured):
        triton.knobs.nvidia.dump_ptxas_log = True
        compiled = triton.compile(source, target=gpu, options=case.options)
    return compiled, captured.getvalue()


def _one_line(err: BaseException) -> str:
    cause = err.__cause__ or err
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    where = lines[0] if lines else ""
    return f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''} ({where})"


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_log(compiled: Any, target: Target) -> str:
    """`ptxas -v` on the kernel's PTX with the options of Triton's own ptxas call
    (triton/backends/nvidia/compiler.py, make_cubin): for kernels Triton took from its cache."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    fmad = [] if compiled.metadata.enable_fp_fusion else ["--fmad=false"]
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp, "kernel.ptx")
        ptx.write_text(compiled.asm["ptx"])
        command = [get_ptxas(target.arch).path, "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2"]
        command += [f"--gpu-name={sm_arch_from_capability(target.arch)}", str(ptx), "-o", str(Path(tmp, "k.cubin"))]
        return subprocess.run(command, capture_output=True, text=True, check=True).stderr


def _nvidia_resources(ptxas_log: str) -> dict[str, int | None]:
    used, spills = _PTXAS_USED.search(ptxas_log), _PTXAS_SPILLS.search(ptxas_log)
    return {
        "registers": int(used.group(1)) if used else None,
        "spill_stores": int(spills.group(1)) if spills else None,
        "spill_loads": int(spills.group(2)) if spills else None,
    }


def _amd_resources(amdgcn: str) -> dict[str, int | None]:
    """VGPRs (the per-lane registers), SGPRs and spills from the code object's metadata notes."""

    def field_value(name: str) -> int | None:
        found = re.search(rf"^\s*\.{name}:\s+(\d+)", amdgcn, re.MULTILINE)
        return int(found.group(1)) if found else None

    vgpr_spills, sgpr_spills = field_value("vgpr_spill_count"), field_value("sgpr_spill_count")
    return {
        "registers": field_value("vgpr_count"),
        "sgprs": field_value("sgpr_count"),
        # AMD reports spilled registers (counts), not bytes; stores and loads are the same spills.
        "spill_stores": vgpr_spills + sgpr_spills if vgpr_spills is not None and sgpr_spills is not None else None,
        "spill_loads": None,
        "scratch_bytes": field_value("private_segment_fixed_size"),
    }


# ---- running the matrix in clean worker processes -----------------------------------------------
def compile_all(
    selected: list[Case], jobs: int | None = None, progress: Callable[[dict[str, Any]], None] | None = None
) -> list[dict[str, Any]]:
    """Compile `selected` in `jobs` worker processes (default: one per core); rows in input order."""
    if not selected:
        return []
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(selected)))
    results: queue.Queue[tuple[int, dict[str, Any]] | BaseException | None] = queue.Queue()
    shares = [list(range(i, len(selected), jobs)) for i in range(jobs)]  # interleaved: similar costs
    threads = [threading.Thread(target=_run_worker, args=(selected, share, results), daemon=True) for share in shares]
    for thread in threads:
        thread.start()
    rows: dict[int, dict[str, Any]] = {}
    finished = 0
    while finished < jobs:
        item = results.get()
        if item is None:
            finished += 1
        elif isinstance(item, BaseException):
            raise item
        else:
            rows[item[0]] = item[1]
            if progress is not None:
                progress(item[1])
    return [rows[i] for i in range(len(selected))]


def _worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    return env


def _run_worker(selected: list[Case], share: list[int], results: queue.Queue) -> None:
    """One worker process compiles `share` (indices into `selected`), one JSON line per case."""
    try:
        specs = json.dumps([dataclasses.asdict(selected[i]) for i in share])
        command = [sys.executable, "-m", "sparse_train.kernels.aot"]
        with subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_worker_env()
        ) as worker:
            assert worker.stdin is not None and worker.stdout is not None and worker.stderr is not None
            worker.stdin.write(specs)
            worker.stdin.close()
            for position, line in zip(share, worker.stdout, strict=False):
                results.put((position, json.loads(line)))
            stderr = worker.stderr.read()
        if worker.returncode != 0:
            raise RuntimeError(f"AOT compile worker failed (exit {worker.returncode}): {stderr[-2000:]}")
        results.put(None)
    except BaseException as err:  # noqa: BLE001 - handed to the main thread
        results.put(err)
        results.put(None)


def _worker_main() -> None:
    """Cases as JSON objects on stdin, one result line each on stdout as soon as it is compiled."""
    for spec in json.loads(sys.stdin.read()):
        print(json.dumps(compile_case(Case(**spec))), flush=True)


# ---- checks --------------------------------------------------------------------------------------
COMPILE_PROBLEM, SHARED_PROBLEM, SPILL_PROBLEM, STALE_PROBLEM = (
    "does not compile",
    "shared memory",
    "spills registers",
    "pruned as spilling but does not spill",
)


def spills(row: dict[str, Any]) -> bool:
    return bool(row.get("spill_stores") or row.get("spill_loads"))


def problems(row: dict[str, Any]) -> list[str]:
    """Why a compiled case could not run well on its target: no compile, too much shared memory,
    spilled registers in a selectable configuration; or a configuration pruned as spilling that
    does not spill (a stale line of the spilling table). Empty when fine. A pruned configuration
    that spills is fine: the autotuner never tries it there."""
    if not row["ok"]:
        return [f"{COMPILE_PROBLEM}: {row['error']}"]
    found = []
    if row["shared"] > row["shared_limit"]:
        found.append(f"{SHARED_PROBLEM} {row['shared']} B > {row['shared_limit']} B per block")
    selectable = row.get("selectable", True)
    if selectable and spills(row):
        found.append(f"{SPILL_PROBLEM} (stores {row.get('spill_stores')}, loads {row.get('spill_loads')})")
    if not selectable and not spills(row):
        found.append(f"{STALE_PROBLEM} (remove it from spilling_configs.txt)")
    return found


def cannot_run(row: dict[str, Any]) -> bool:
    """Does not compile or does not fit its target's shared memory."""
    return any(p.startswith((COMPILE_PROBLEM, SHARED_PROBLEM)) for p in problems(row))


def describe(row: dict[str, Any]) -> str:
    return f"{row['kernel']} [{row['config']}] {row['dtype']} on {row['target']} ({row['gpu']})"


if __name__ == "__main__":
    _worker_main()
