"""`sparse-train bench moe-layer`: our MoE layer against its dense limit and the layers people run.

For every shape, one JSON object. Times are forward+backward in ms, medians of interleaved
repeats after warm-up (bench.measure):

  ours_ms                 sparse_train's MoELayer (dropless, top-k renormalised, with its aux losses),
                          with the first of --backends (kernel_backend: which one ran)
  ours_<backend>_ms       the same layer with each kernel backend of --backends, e.g. ours_triton_ms,
                          ours_grouped_mm_ms (a backend that cannot run here: null and ours_<backend>_error)
  <backend>_max_abs_diff_vs_reference  max |output - the per-expert reference loop's|, same precision
  dense_ms                a dense SwiGLU of width top_k * expert_hidden on the same tokens: the limit
  hf_<impl>_ms            transformers' MixtralSparseMoeBlock, identical weights and inputs, per
                          experts_implementation; hf_mixtral_ms is the fastest that ran
  deepspeed_ms            deepspeed.moe.layer.MoE, same experts and router, no token dropped
  ratio_vs_dense          ours_ms / dense_ms
  speedup_vs_hf           hf_mixtral_ms / ours_ms
  speedup_vs_deepspeed    deepspeed_ms / ours_ms
  max_abs_diff_vs_hf      max |ours - HF eager| over the outputs, fp32
  peak_mem_mb_ours/_dense peak MiB allocated by forward+backward beyond parameters and gradients
  ours_tflops/dense_tflops useful FLOPs (6 * tokens * k * 3 * d * F) per second

A peer that cannot run (not installed, would not fit in memory, raised) gets null and a
`<peer>_error` string saying why; nothing is silently skipped. With `precision="bf16"` every
candidate runs under bf16 autocast (fp32 weights), as `train.precision=bf16` trains.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from sparse_train.bench.measure import interleaved_median_ms, peak_activation_mb
from sparse_train.config import MoEConfig, RouterConfig
from sparse_train.kernels import resolve_backend
from sparse_train.models.experts import SwiGLU
from sparse_train.models.moe import MoELayer


@dataclass(frozen=True)
class Shape:
    name: str
    tokens: int
    d_model: int
    num_experts: int
    top_k: int
    expert_hidden: int
    skew: float = 0.0  # fraction of tokens whose first choice is forced to expert 0


SHAPES = {
    "mixtral-like": Shape("mixtral-like", 8192, 512, 8, 2, 1024),
    "fine-grained": Shape("fine-grained", 8192, 512, 64, 8, 128),
    "skewed": Shape("skewed", 8192, 512, 8, 2, 1024, skew=0.5),
}


def available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def build_problem(shape: Shape, seed: int, device: torch.device) -> tuple[MoELayer, torch.Tensor, torch.Tensor]:
    """Our layer with random weights, the input [1, T, d] and the output gradient."""
    g = torch.Generator().manual_seed(seed)
    moe = MoEConfig(num_experts=shape.num_experts, expert_hidden=shape.expert_hidden)
    layer = MoELayer(shape.d_model, moe, RouterConfig(top_k=shape.top_k, renormalize=True))
    with torch.no_grad():
        # Unit-variance outputs: each weight scaled by its fan-in (the input dim, D or F, of the
        # stacked [E, in, ...] expert tensors; the router is [E, D] and starts small).
        layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=g) * 0.1 / shape.num_experts**0.5)
        for p in layer.experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    x = torch.randn(1, shape.tokens, shape.d_model, generator=g)
    if shape.skew:
        # Feature 0 of the first `skew` share of tokens drives expert 0's logit far above the rest.
        n = int(shape.tokens * shape.skew)
        with torch.no_grad():
            x[0, :n, 0] = 4.0 + x[0, :n, 0].abs()
            x[0, n:, 0] = -x[0, n:, 0].abs()
            layer.router.weight[0, 0] = 5.0
    dy = torch.randn(1, shape.tokens, shape.d_model, generator=g)
    # Inside a model the layer's input is a hidden state: every candidate also computes dX.
    return layer.to(device), x.to(device).requires_grad_(), dy.to(device)


def dense_equivalent(layer: MoELayer, shape: Shape) -> SwiGLU:
    """A dense SwiGLU with the active parameters of the MoE layer: width top_k * expert_hidden."""
    dense = SwiGLU(shape.d_model, shape.top_k * shape.expert_hidden).to(layer.router.weight.device)
    with torch.no_grad():
        w = layer.experts
        dense.w_gate.weight.copy_(torch.cat([w.gate_EDF()[e].t() for e in range(shape.top_k)]))
        dense.w_up.weight.copy_(torch.cat([w.up_EDF()[e].t() for e in range(shape.top_k)]))
        dense.w_down.weight.copy_(torch.cat([w.w_down[e] for e in range(shape.top_k)]).t())
    return dense


def hf_mixtral_block(layer: MoELayer, shape: Shape) -> torch.nn.Module:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(
        hidden_size=shape.d_model,
        intermediate_size=shape.expert_hidden,
        num_local_experts=shape.num_experts,
        num_experts_per_tok=shape.top_k,
        router_jitter_noise=0.0,
        hidden_act="silu",
    )
    config._experts_implementation = "eager"
    block = MixtralSparseMoeBlock(config).to(layer.router.weight.device)
    with torch.no_grad():
        w = layer.experts
        block.gate.weight.copy_(layer.router.weight)
        block.experts.gate_up_proj.copy_(w.w_gate_up.flatten(2).transpose(1, 2))
        block.experts.down_proj.copy_(w.w_down.transpose(1, 2))
    return block


def deepspeed_moe(layer: MoELayer, shape: Shape) -> torch.nn.Module:
    """deepspeed.moe.layer.MoE in a one-process gloo group, with our router and experts' weights."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        dist.init_process_group("gloo", rank=0, world_size=1)
    from deepspeed.moe.layer import MoE

    moe = MoE(
        hidden_size=shape.d_model,
        expert=SwiGLU(shape.d_model, shape.expert_hidden),
        num_experts=shape.num_experts,
        ep_size=1,
        k=shape.top_k,
        drop_tokens=False,
        use_rts=False,
        top2_2nd_expert_sampling=False,
    ).to(layer.router.weight.device)
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(layer.router.weight)
        w = layer.experts
        for e, expert in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
            expert.w_gate.weight.copy_(w.gate_EDF()[e].t())
            expert.w_up.weight.copy_(w.up_EDF()[e].t())
            expert.w_down.weight.copy_(w.w_down[e].t())
    return moe


def _fwd_bwd(forward: Callable[[], torch.Tensor], dy: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        forward().backward(dy)

    return step


def bench_shape(
    shape: Shape,
    *,
    repeats: int,
    warmup: int,
    seed: int,
    peers: set[str],
    log,
    device: torch.device | None = None,
    backends: tuple[str, ...] = ("auto",),
    precision: str = "fp32",
) -> dict[str, Any]:
    """One shape's JSON object. The first of `backends` is "ours" and must run; the others are
    measured beside it and, like peers, get null and an error where they cannot run."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    layer, x, dy = build_problem(shape, seed, device)
    x_flat, dy_flat = x.view(-1, shape.d_model), dy.reshape(-1, shape.d_model)
    dense = dense_equivalent(layer, shape)
    result: dict[str, Any] = {"shape": shape.name, **{k: v for k, v in asdict(shape).items() if k != "name"}}
    result["precision"] = precision
    result["kernel_backend"] = resolve_backend(backends[0], device)

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    def layer_step(backend: str) -> Callable[[], None]:
        def step() -> None:
            layer.experts.backend = backend
            with autocast():
                y, aux = layer(x)
                # What training back-propagates: the output and the router's auxiliary losses.
                total_aux = aux.lb_loss + aux.z_loss
            torch.autograd.backward([y, total_aux], [dy.to(y.dtype), torch.ones_like(total_aux)])

        return step

    def with_autocast(step: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            with autocast():
                step()

        return run

    candidates = {"ours": layer_step(backends[0])}
    for backend in backends[1:]:
        candidates[f"ours_{backend}"] = layer_step(backend)
    candidates["dense"] = with_autocast(_fwd_bwd(lambda: dense(x_flat), dy_flat))
    with torch.no_grad():
        layer.experts.backend = backends[0]
        y_ours, aux = layer(x)
        result["expert_load_max"] = round(float(aux.expert_load_E.max()), 4)
    result.update(_diffs_vs_reference(layer, x, backends, autocast))

    if "hf" in peers:
        try:
            block = hf_mixtral_block(layer, shape)
            with torch.no_grad():
                result["max_abs_diff_vs_hf"] = float((block(x) - y_ours).abs().max())
            for impl in ("eager", "grouped_mm", "batched_mm"):
                # batched_mm gathers one [d, F] weight pair per (token, slot): skip what cannot fit
                need = 3 * shape.tokens * shape.top_k * shape.d_model * shape.expert_hidden * x.element_size()
                if impl == "batched_mm" and need > 0.6 * available_memory_bytes():
                    result[f"hf_{impl}_ms"] = None
                    result[f"hf_{impl}_error"] = f"skipped: needs ~{need / 2**30:.0f} GiB of weight copies"
                    continue
                candidates[f"hf_{impl}"] = with_autocast(_hf_step(block, impl, x, dy))
        except Exception as err:  # noqa: BLE001 - a peer failing is a result, not a crash
            result["hf_mixtral_ms"], result["hf_error"] = None, f"{type(err).__name__}: {err}"[:300]
    if "deepspeed" in peers:
        try:
            ds = deepspeed_moe(layer, shape)
            candidates["deepspeed"] = with_autocast(_fwd_bwd(lambda: ds(x)[0], dy))
        except Exception as err:  # noqa: BLE001
            result["deepspeed_ms"], result["deepspeed_error"] = None, f"{type(err).__name__}: {err}"[:300]

    runnable = {}
    for name, step in candidates.items():
        try:
            step()
            runnable[name] = step
        except Exception as err:  # noqa: BLE001
            if name == "ours":
                raise  # what the benchmark is about: a failure here is the result
            result[f"{name}_ms"], result[f"{name}_error"] = None, f"{type(err).__name__}: {err}"[:300]
    log(f"{shape.name}: timing {', '.join(runnable)} ({warmup} warm-up + {repeats} interleaved repeats)")
    times = interleaved_median_ms(runnable, repeats=repeats, warmup=warmup, device=device)
    for name, ms in times.items():
        result[f"{name}_ms"] = round(ms, 2)
    if len(backends) > 1:
        result[f"ours_{backends[0]}_ms"] = result["ours_ms"]

    result["ratio_vs_dense"] = round(result["ours_ms"] / result["dense_ms"], 4)
    hf_times = [ms for k, ms in result.items() if k.startswith("hf_") and k.endswith("_ms") and ms is not None]
    if "hf" in peers:
        result["hf_mixtral_ms"] = min(hf_times) if hf_times else None
        result["speedup_vs_hf"] = round(result["hf_mixtral_ms"] / result["ours_ms"], 4) if hf_times else None
    if "deepspeed" in peers:
        ds_ms = result.get("deepspeed_ms")
        result["speedup_vs_deepspeed"] = round(ds_ms / result["ours_ms"], 4) if ds_ms else None
    log(f"{shape.name}: measuring peak activation memory")
    layer.experts.backend = backends[0]
    # x.grad, like the parameters' gradients, is the step's result rather than its working memory
    result["peak_mem_mb_ours"] = round(peak_activation_mb(candidates["ours"], [*layer.parameters(), x]), 3)
    result["peak_mem_mb_dense"] = round(peak_activation_mb(candidates["dense"], [*dense.parameters(), x]), 3)
    flops = 6 * shape.tokens * shape.top_k * 3 * shape.d_model * shape.expert_hidden
    result["ours_tflops"] = round(flops / result["ours_ms"] / 1e9, 4)
    result["dense_tflops"] = round(flops / result["dense_ms"] / 1e9, 4)
    if device.type == "cuda":
        result["dense_matmul_tflops"] = _matmul_tflops(flops, device)
        result["gpu"] = torch.cuda.get_device_name(device)
    result["device"] = device.type
    result["threads"] = torch.get_num_threads()
    return result


def _diffs_vs_reference(
    layer: MoELayer,
    x: torch.Tensor,
    backends: tuple[str, ...],
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> dict[str, Any]:
    """Each backend's forward against the per-expert reference loop's, in the same precision:
    a speed of a wrong kernel is no result. A backend that cannot run is left to the timing loop
    to report."""
    diffs: dict[str, Any] = {}
    with torch.no_grad(), autocast():
        layer.experts.backend = "reference"
        want = layer(x)[0].float()
        for backend in backends:
            layer.experts.backend = backend
            try:
                got = layer(x)[0].float()
            except Exception:  # noqa: BLE001 - reported with its message by the timing loop
                continue
            diffs[f"{backend}_max_abs_diff_vs_reference"] = float((got - want).abs().max())
    layer.experts.backend = backends[0]
    return diffs


def _hf_step(block: torch.nn.Module, impl: str, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        block.experts.config._experts_implementation = impl
        block(x).backward(dy)

    return step


def _matmul_tflops(flops: int, device: torch.device) -> float:
    """One plain square-ish matmul doing the same FLOPs: the device's dense GEMM rate."""
    n = int(round((flops / 2) ** (1 / 3)))
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = interleaved_median_ms({"mm": lambda: a @ a}, repeats=5, warmup=2, device=device)["mm"]
    return round(2 * n**3 / ms / 1e9, 2)


def run(
    argv_shapes: list[str],
    *,
    tokens: int | None,
    repeats: int,
    warmup: int,
    seed: int,
    peers: set[str],
    as_json: bool,
    device: torch.device | None = None,
    backends: tuple[str, ...] = ("auto",),
    precision: str = "fp32",
) -> list[dict[str, Any]]:
    results = []
    for name in argv_shapes:
        shape = SHAPES[name]
        if tokens is not None:
            shape = Shape(**{**asdict(shape), "tokens": tokens})
        result = bench_shape(
            shape,
            repeats=repeats,
            warmup=warmup,
            seed=seed,
            peers=peers,
            log=lambda m: print(m, file=sys.stderr),
            device=device,
            backends=backends,
            precision=precision,
        )
        results.append(result)
        print(json.dumps(result), flush=True)
    if not as_json:
        print(format_table(results), file=sys.stderr)
    return results


def format_table(results: list[dict[str, Any]]) -> str:
    cols = [
        "shape",
        "kernel_backend",
        "ours_ms",
        *sorted({k for r in results for k in r if k.startswith("ours_") and k.endswith("_ms")}),
        "dense_ms",
        "ratio_vs_dense",
        "hf_mixtral_ms",
        "speedup_vs_hf",
        "deepspeed_ms",
        "speedup_vs_deepspeed",
        "max_abs_diff_vs_hf",
        "peak_mem_mb_ours",
        "peak_mem_mb_dense",
    ]
    lines = [" | ".join(cols)]
    for r in results:
        lines.append(" | ".join(str(r.get(c)) for c in cols))
    return "\n".join(lines)
