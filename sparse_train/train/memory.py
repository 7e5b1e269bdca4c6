"""Memory per rank: what a user sees (measured peaks) and what the layout should need (predicted).

Measured: the most the device allocated (CUDA), or the process's peak resident set (CPU,
Linux: getrusage reports KiB). CPU peaks include the process's fixed cost (interpreter, torch,
process group, data), which the prediction takes as `baseline_mb`.

Predicted (`predict`): arithmetic from this rank's part of the model and the config, no
measurement of the step itself. In MiB per rank:

    params        this rank's parameters (local shards), at their dtype
    grads         the same again (gradients have the parameters' dtype and sharding)
    optimizer     AdamW's exp_avg and exp_avg_sq, fp32, for every local parameter element
    fsdp_buffers  FSDP2's unsharded copies during forward and backward (`fsdp_buffer_bytes`)
    activations   what one micro-batch's forward leaves for its backward, times the micro-
                  batches a pipeline stage holds at once (`activation_bytes`)
    optimizer_step  temporaries of the optimizer step: fused AdamW updates in place, so only an
                  allowance of the largest parameter is kept

    step = baseline + params + grads + optimizer + max(activations + fsdp_buffers, optimizer_step)

Gradients are counted as present during the whole forward and backward: true from the second
micro-batch of a step on, an upper bound for the first (they are allocated as activations are
freed). The routed experts' share assumes evenly balanced routing (a rank's experts receive
top_k x its tokens); a skewed router costs the busiest rank more.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from sparse_train.config import Config
from sparse_train.models.sparse import SparseFFN
from sparse_train.parallel.dims import ParallelDims

MB = 2**20
FP32 = 4
INDEX = 8  # int64 row indices, expert ids


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_mb(device: torch.device) -> float:
    """What this process holds now: CUDA tensors allocated, or the resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / MB
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / MB


def per_rank(values: list[float], device: torch.device, distributed: bool) -> list[list[float]]:
    """Every rank's `values`, by rank, on every rank (one all-reduce of a [world, n] table: works
    on every backend, unlike gathers of uneven objects)."""
    if not distributed:
        return [list(values)]
    table = torch.zeros(dist.get_world_size(), len(values), dtype=torch.float64, device=device)
    table[dist.get_rank()] = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(table)
    return table.tolist()


# ---- prediction -----------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryPrediction:
    params_mb: float
    grads_mb: float
    optimizer_mb: float
    fsdp_buffers_mb: float
    activations_mb: float
    optimizer_step_mb: float
    baseline_mb: float = 0.0

    @property
    def state_mb(self) -> float:
        """Parameters, gradients and AdamW moments: held from the first optimizer step on."""
        return self.params_mb + self.grads_mb + self.optimizer_mb

    @property
    def step_mb(self) -> float:
        transient = max(self.activations_mb + self.fsdp_buffers_mb, self.optimizer_step_mb)
        return self.baseline_mb + self.state_mb + transient

    def as_dict(self) -> dict[str, float]:
        return {**{k: round(v, 1) for k, v in asdict(self).items()}, "step_mb": round(self.step_mb, 1)}


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def local_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of this rank's parts of `tensors` (a DTensor's local shard, a plain tensor whole)."""
    return sum(local_tensor(t).numel() * local_tensor(t).element_size() for t in tensors)


def predict(
    module: nn.Module,
    cfg: Config,
    dims: ParallelDims | None,
    *,
    pp_rank: int = 0,
    baseline_mb: float = 0.0,
) -> MemoryPrediction:
    """The predicted peak of one training step on this rank (module docstring). `module` is this
    rank's part of the model (sharded, or a pipeline stage)."""
    params = [p for p in module.parameters() if p.requires_grad]
    param_bytes = local_bytes(params)
    fp32_bytes = sum(local_tensor(p).numel() for p in params) * FP32  # AdamW keeps fp32 moments
    largest = max((local_bytes([p]) for p in params), default=0)
    return MemoryPrediction(
        params_mb=param_bytes / MB,
        grads_mb=param_bytes / MB,
        optimizer_mb=2 * fp32_bytes / MB,
        fsdp_buffers_mb=fsdp_buffer_bytes(module, dims) / MB,
        activations_mb=activation_bytes(module, cfg, dims, pp_rank) / MB,
        optimizer_step_mb=largest / MB,
        baseline_mb=baseline_mb,
    )


def fsdp_units(module: nn.Module) -> list[tuple[nn.Module, list[nn.Parameter]]]:
    """FSDP2 units, outermost first, each with the parameters it manages (not its sub-units')."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    inner: set[int] = set()
    managed = []
    for unit in reversed(units):  # innermost first: a unit's parameters exclude its sub-units'
        own = [p for p in unit.parameters() if id(p) not in inner]
        inner.update(id(p) for p in own)
        managed.append((unit, own))
    return list(reversed(managed))


def fsdp_buffer_bytes(module: nn.Module, dims: ParallelDims | None) -> int:
    """FSDP2's transient memory, from its code (torch/distributed/fsdp/_fully_shard): a unit's
    all-gather makes the whole unit (local bytes x the ranks it is sharded over: dp_shard, or
    edp for the experts' own unit), then copies it out into the unsharded parameters (2x while
    both exist); in the backward the unit holds its unsharded parameters, their unsharded
    gradients and the reduce-scatter input they are copied into (3x), while the next unit's
    all-gather output is already prefetched (+1x): 4x the largest non-root unit. The root
    (embeddings, final norm, output projection) stays unsharded from its forward to the end of
    the backward, with its unsharded gradients: 2x. Zero without data parallelism."""
    if dims is None or dims.dp == 1:
        return 0
    units = fsdp_units(module)
    if not units:
        return 0
    experts = {id(layer.experts) for layer in module.modules() if isinstance(layer, SparseFFN)}
    sizes = []
    for unit, own in units:
        world = dims.edp if id(unit) in experts else dims.dp_shard
        sizes.append(local_bytes(own) * world)
    root, others = sizes[0], sizes[1:]
    return 2 * root + 4 * max(others, default=0)


def activation_bytes(
    module: nn.Module, cfg: Config, dims: ParallelDims | None, pp_rank: int = 0, *, saved_only: bool = False
) -> int:
    """Bytes one micro-batch's forward saves for its backward on this rank (plus the logits and
    their gradient on the last stage), times the micro-batches in flight (1F1B: stage r of pp
    holds min(pp - r, grad_accum) of them). `saved_only`: one micro-batch's saved tensors only
    (what tests compare with the autograd graph).

    Counted per block from what each op saves (checked against the tensors autograd holds,
    tests/train/test_memory.py). T = this rank's tokens per micro-batch, D = d_model, c = bytes
    of the compute dtype (2 under bf16 autocast, else 4); norms, the residual stream, routers and
    the loss stay fp32:
      each RMSNorm      input and input * rstd (2 T D fp32) and rstd (T)
      attention         the projections' input (fp32: one tensor; bf16: each of q/k/v casts its
                        own: 3 T D c), q, k, v and the output (4 T D / tp c), log-sum-exp (T H / tp)
      dense SwiGLU      input (fp32 shared, bf16 2 T D c), gate, silu(gate), up, product (4 T F / tp c)
      MoE               router logits and probabilities (2 T E fp32), top-k ids and weights,
                        expert input rows (under EP: received, ~A rows; bf16: a cast copy),
                        gate/up, silu, product per assignment (4 A F / tp c), A = T top_k
      FFF               the same for leaves (A = T x leaves per token), the tree's path
                        probabilities (~6 T L fp32), the master leaf as a dense FFN
      last stage        final norm, its output, log-softmax (T V fp32), the logits kept by
                        the model output (T V c) and, in the backward, their gradient (T V fp32)
      bf16 autocast     the bf16 copies of the weights each matmul casts (2 bytes per element
                        of every matrix as the forward sees it, FSDP-unsharded)
    """
    m, t = cfg.model, cfg.train
    dp = dims.dp if dims else 1
    tp = dims.tp if dims else 1
    T = (t.batch_size // dp) * cfg.data.seq_len
    D = m.d_model
    bf16 = t.precision == "bf16"
    c = 2 if bf16 else FP32
    blocks = module.blocks.values() if isinstance(module.blocks, nn.ModuleDict) else module.blocks
    total = 0
    for block in blocks:
        total += 2 * _norm(T, D)
        total += (3 * T * D * c if bf16 else T * D * FP32) + 4 * T * D // tp * c + T * (m.n_heads // tp) * FP32
        ffn = block.ffn
        if isinstance(ffn, SparseFFN):
            total += _sparse_ffn(ffn, cfg, T, D, c, bf16, dims)
        else:
            total += _swiglu(T, D, m.ffn_hidden // tp, c, bf16, own_input=True)
    if getattr(module, "lm_head", None) is not None:
        V = m.vocab_size
        total += _norm(T, D) + T * D * c + T * V * FP32  # final norm, its output, log-softmax
        if not saved_only:
            total += T * V * c + T * V * FP32  # the logits the output holds; their gradient
    if bf16:
        total += 2 * _matmul_weight_elements(module, dims)
    pp = dims.pp if dims else 1
    if saved_only:
        return total
    in_flight = min(pp - pp_rank, t.grad_accum) if pp > 1 else 1
    return total * in_flight


def _norm(T: int, D: int) -> int:
    return 2 * T * D * FP32 + T * FP32


def _swiglu(T: int, D: int, hidden: int, c: int, bf16: bool, *, own_input: bool) -> int:
    """A dense SwiGLU's saved tensors; its fp32 input is counted by whoever else reads it
    (`own_input=False`: the router beside the shared experts, the tree beside the master leaf)."""
    if bf16:
        inputs = 2 * T * D * c  # w_gate and w_up each save their own bf16 cast
    else:
        inputs = T * D * FP32 if own_input else 0
    return inputs + 4 * T * hidden * c


def _sparse_ffn(ffn: SparseFFN, cfg: Config, T: int, D: int, c: int, bf16: bool, dims: ParallelDims | None) -> int:
    ep = dims.ep if dims else 1
    tp = dims.tp if dims else 1
    total = T * D * FP32  # the norm's output, fp32: the router's (tree's) input
    if ffn.kind == "fff":
        f = cfg.fff
        per_token = {"soft": f.num_leaves, "topk_paths": f.top_k, "hard": 1}[f.mode]
        width = f.leaf_width // tp
        total += 6 * T * f.num_leaves * FP32 + T * (f.num_leaves - 1) * FP32
        A = T * per_token
        if f.leaf_activation == "swiglu":
            hidden = 4 * A * width * c
        else:  # pre-GELU, GELU, weighted GELU per assignment; the output rows the scatter-add keeps
            hidden = 3 * A * width * c + A * D * c
        if f.master_leaf:
            master = (f.master_leaf_width or f.leaf_width) // tp
            total += (
                _swiglu(T, D, master, c, bf16, own_input=False) if f.leaf_activation == "swiglu" else 2 * T * master * c
            )
    else:
        k, E = cfg.router.top_k, cfg.moe.num_experts
        total += 2 * T * E * FP32 + T * k * (INDEX + 2 * FP32) + T * FP32
        A = T * k
        hidden = 4 * A * (cfg.moe.expert_hidden // tp) * c
        shared = cfg.moe.num_shared_experts * (cfg.moe.shared_expert_hidden or cfg.moe.expert_hidden)
        if shared:
            total += _swiglu(T, D, shared // tp, c, bf16, own_input=False)
    total += A * (3 * INDEX + FP32)  # sorted rows, orders, routing weight per assignment
    rows = A if ep > 1 else T  # received rows under EP (at most one per assignment); else the tokens
    if ep > 1 or bf16:
        total += rows * D * c  # the experts' own copy of their input rows
    return total + hidden


def _matmul_weight_elements(module: nn.Module, dims: ParallelDims | None) -> int:
    """Elements of the weight matrices that bf16 autocast casts, as the forward sees them
    (FSDP-unsharded): every parameter of two or more dims but the embedding, routers and FFF
    node neurons (fp32 by design)."""
    skip: set[int] = set()
    for sub in module.modules():
        if isinstance(sub, nn.Embedding):
            skip.update(id(p) for p in sub.parameters())
        if isinstance(sub, SparseFFN):
            router = getattr(sub, "router", None) or getattr(sub, "tree", None)
            skip.update(id(p) for p in router.parameters())
    experts = {id(p) for s in module.modules() if isinstance(s, SparseFFN) for p in s.experts.parameters()}
    total = 0
    for p in module.parameters():
        if p.dim() < 2 or id(p) in skip:
            continue
        unsharded = 1
        if dims is not None and dims.dp > 1:
            unsharded = dims.edp if id(p) in experts and (dims.ep > 1 or dims.tp > 1) else dims.dp_shard
        total += local_tensor(p).numel() * unsharded
    return total


# ---- what the device can hold -----------------------------------------------------------------
def capacity_mb(device: torch.device) -> float | None:
    """The most this rank can hold: on CUDA the device's free memory plus what this process
    already reserved; on CPU the machine's available RAM shared evenly among the local ranks
    (LOCAL_WORLD_SIZE), plus what this process already holds. None when unknown."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return (free + torch.cuda.memory_reserved(device)) / MB
    available = _mem_available_mb()
    if available is None:
        return None
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return available / local_ranks + current_mb(device)


def _mem_available_mb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def shortfall(prediction: MemoryPrediction, capacity: float | None, layout: str) -> str | None:
    """One line when the predicted step peak exceeds `capacity`, else None."""
    if capacity is None or prediction.step_mb <= capacity:
        return None
    p = prediction
    return (
        f"predicted peak memory {p.step_mb:,.0f} MB per rank exceeds the {capacity:,.0f} MB this rank can have "
        f"({layout}: parameters {p.params_mb:,.0f} + gradients {p.grads_mb:,.0f} + AdamW {p.optimizer_mb:,.0f} + "
        f"activations {p.activations_mb:,.0f} + FSDP buffers {p.fsdp_buffers_mb:,.0f} + process {p.baseline_mb:,.0f} "
        "MB); lower train.batch_size or data.seq_len, or shard over more ranks"
    )


def held_tensor_bytes(module: nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes of this rank's parameters, gradients, buffers and optimizer state tensors."""
    tensors = [*module.parameters(), *module.buffers()]
    tensors += [p.grad for p in module.parameters() if p.grad is not None]
    if optimizer is not None:
        tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return local_bytes(tensors)


def process_baseline_mb(device: torch.device, module: nn.Module, optimizer: torch.optim.Optimizer | None) -> float:
    """What this process holds besides its training tensors: on CPU the resident set minus
    those tensors (interpreter, torch, process group, data); 0 on CUDA (the device holds only
    tensors; the CUDA context is outside `max_memory_allocated` and outside the capacity)."""
    if device.type == "cuda":
        return 0.0
    return max(0.0, current_mb(device) - held_tensor_bytes(module, optimizer) / MB)


def is_out_of_memory(err: BaseException) -> bool:
    """torch's out-of-memory errors: torch.OutOfMemoryError (CUDA), and on CPU the RuntimeError
    of the default allocator ("DefaultCPUAllocator: can't allocate memory: ..."). On Linux a
    CPU process more often meets the kernel's OOM killer (SIGKILL), which no handler sees."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "can't allocate memory" in str(err)
