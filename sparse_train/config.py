"""The run configuration: one dataclass per component, validated on construction.

Precedence: `--set key=value` overrides > YAML file > the defaults below. Configs hold plain
values only (no devices, process groups or other runtime objects).
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from sparse_train.configtypes import (
    ConfigError,
    Section,
    apply_override,
    from_dict,
    option,
    parse_override,
)

__all__ = [
    "AttentionConfig",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "FFFConfig",
    "LoggingConfig",
    "ModelConfig",
    "MoEConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "RopeScalingConfig",
    "RouterConfig",
    "TrainConfig",
    "compose_config",
    "load_config",
    "read_config_file",
]


def _positive(section: Section, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value is not None and value <= 0:
            raise ConfigError(name, f"must be > 0, got {value}")


def _non_negative(section: Section, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value is not None and value < 0:
            raise ConfigError(name, f"must be >= 0, got {value}")


@dataclass
class RopeScalingConfig(Section):
    kind: Literal["none", "yarn"] = option(
        "none", "context extension of the rotary embedding: none, or YaRN (DeepSeek-V3, gpt-oss)"
    )
    factor: float = option(1.0, "yarn: context extension factor (new length / original length)")
    original_max_seq_len: int | None = option(None, "yarn: the context length the model was pre-trained with")
    beta_fast: float = option(32.0, "yarn: rotations above which frequencies are kept (extrapolated)")
    beta_slow: float = option(1.0, "yarn: rotations below which frequencies are divided by factor (interpolated)")
    attention_factor: float | None = option(
        None, "yarn: scale of cos/sin; null = inferred from factor (and mscale, mscale_all_dim)"
    )
    mscale: float | None = option(None, "yarn: DeepSeek's mscale (with mscale_all_dim, infers attention_factor)")
    mscale_all_dim: float | None = option(
        None, "yarn: DeepSeek's mscale_all_dim; also scales MLA's softmax by mscale(factor, mscale_all_dim)^2"
    )
    truncate: bool = option(True, "yarn: round the correction range to whole dimensions (gpt-oss: false)")

    def validate(self) -> None:
        _positive(self, "factor", "original_max_seq_len", "beta_fast", "beta_slow", "attention_factor")
        if self.kind == "yarn" and self.original_max_seq_len is None:
            raise ConfigError("original_max_seq_len", "yarn scaling needs the pre-training context length")


@dataclass
class AttentionConfig(Section):
    kind: Literal["gqa", "mla"] = option(
        "gqa",
        "gqa = multi-head attention with grouped key/value heads (model.n_kv_heads); mla = multi-head latent "
        "attention (DeepSeek-V2/V3): low-rank query and key/value compression and a decoupled rotary part",
    )
    head_dim: int | None = option(None, "gqa: width of each query/key/value head; null = d_model / n_heads")
    qk_norm: Literal["none", "head", "full"] = option(
        "none",
        "RMSNorm of queries and keys before the rotary embedding: per head over head_dim (Qwen3), or over the "
        "whole projection (OLMoE)",
    )
    out_bias: bool = option(False, "a bias on the output projection (gpt-oss)")
    sinks: bool = option(False, "a learned sink logit per head, in the softmax but attending to nothing (gpt-oss)")
    sliding_window: int | None = option(
        None, "attend to at most this many most recent positions (itself included); null = the whole prefix"
    )
    sliding_layers: list[int] | None = option(
        None, "blocks whose attention uses sliding_window; null = every block (when sliding_window is set)"
    )
    rope_interleave: bool = option(
        False, "rotate adjacent pairs of dimensions (DeepSeek's layout) instead of the two halves (Llama's)"
    )
    q_lora_rank: int | None = option(None, "mla: rank of the query compression; null = a full query projection")
    kv_lora_rank: int = option(64, "mla: rank of the joint key/value compression (the cached latent)")
    qk_nope_head_dim: int = option(32, "mla: per-head query/key width without rotary embedding")
    qk_rope_head_dim: int = option(16, "mla: per-head query/key width with rotary embedding (the key part is shared)")
    v_head_dim: int = option(32, "mla: per-head value width")

    def validate(self) -> None:
        _positive(self, "head_dim", "sliding_window", "q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim")
        _non_negative(self, "qk_nope_head_dim")
        if self.qk_rope_head_dim % 2:
            raise ConfigError("qk_rope_head_dim", f"must be even for rotary embeddings, got {self.qk_rope_head_dim}")
        if self.sliding_layers is not None and self.sliding_window is None:
            raise ConfigError("sliding_layers", "places sliding-window attention: set attention.sliding_window too")
        if self.kind == "mla" and self.qk_norm != "none":
            raise ConfigError("qk_norm", "multi-head latent attention normalises its latents, not q and k")


@dataclass
class ModelConfig(Section):
    vocab_size: int | None = option(None, "vocabulary size; null = the tokenizer's size")
    d_model: int = option(128, "residual stream width")
    n_layers: int = option(4, "number of transformer blocks")
    n_heads: int = option(4, "attention heads; must divide d_model")
    n_kv_heads: int | None = option(None, "key/value heads for grouped-query attention; null = n_heads")
    ffn: Literal["dense", "moe", "fff"] = option(
        "moe",
        "FFN kind of the sparse blocks (placed by model.sparse_every_n / model.sparse_layers): dense SwiGLU, "
        "MoE or FFF tree",
    )
    sparse_every_n: int = option(
        1,
        "a sparse FFN (model.ffn) in every n-th block (blocks n-1, 2n-1, ...), dense SwiGLU elsewhere; 1 = every block",
    )
    sparse_layers: list[int] | None = option(
        None, "explicit indices of the blocks with a sparse FFN; overrides sparse_every_n"
    )
    ffn_hidden: int = option(512, "hidden width of dense SwiGLU FFNs")
    max_seq_len: int = option(256, "longest sequence the rotary embedding table covers")
    rope_theta: float = option(10000.0, "rotary embedding base")
    norm_eps: float = option(1e-5, "RMSNorm epsilon")
    tie_embeddings: bool = option(False, "share the input embedding with the output projection")
    qkv_bias: bool = option(False, "biases on the query/key/value projections (Qwen2)")
    init_std: float = option(0.02, "std of the normal initialisation of weights")
    first_k_dense: int = option(
        0, "the first k blocks have a dense SwiGLU FFN whatever sparse_every_n / sparse_layers say (DeepSeek-V3)"
    )
    mtp_depth: int = option(
        0, "multi-token prediction modules (DeepSeek-V3): module k also predicts the token k+1 places further on"
    )
    mtp_loss_coef: float = option(0.1, "weight of the mean multi-token prediction loss (DeepSeek-V3: 0.3, then 0.1)")
    attention: AttentionConfig = option(factory=AttentionConfig, help="the attention of every block")
    rope_scaling: RopeScalingConfig = option(factory=RopeScalingConfig, help="rotary embedding context extension")

    def validate(self) -> None:
        _positive(self, "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "sparse_every_n")
        _positive(self, "max_seq_len", "rope_theta", "norm_eps", "init_std")
        _non_negative(self, "first_k_dense", "mtp_depth", "mtp_loss_coef")
        if self.attention.kind == "gqa" and self.attention.head_dim is None and self.d_model % self.n_heads != 0:
            raise ConfigError("d_model", f"must be divisible by model.n_heads ({self.n_heads}), got {self.d_model}")
        if self.attention.kind == "gqa" and self.head_dim % 2 != 0:
            raise ConfigError("n_heads", f"the head width ({self.head_dim}) must be even for rotary embeddings")
        if self.attention.kind == "mla" and self.n_kv_heads not in (None, self.n_heads):
            raise ConfigError("n_kv_heads", "multi-head latent attention has one key/value head per query head")
        sliding = self.attention.sliding_layers or []
        if any(not 0 <= i < self.n_layers for i in sliding):
            raise ConfigError("attention.sliding_layers", f"indices must be in [0, {self.n_layers}), got {sliding}")
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads != 0:
            raise ConfigError("n_kv_heads", f"must divide n_heads ({self.n_heads}), got {self.n_kv_heads}")
        if self.sparse_layers is not None and any(i < 0 for i in self.sparse_layers):
            raise ConfigError("sparse_layers", f"block indices must be >= 0, got {self.sparse_layers}")
        if self.ffn != "dense" and self.sparse_layers is not None:
            bad = [i for i in self.sparse_layers if i >= self.n_layers]
            if bad:
                raise ConfigError("sparse_layers", f"indices must be < model.n_layers ({self.n_layers}), got {bad}")

    def is_sparse_layer(self, index: int) -> bool:
        """Whether block `index` holds the sparse FFN slot (what fills it is model.ffn)."""
        if index < self.first_k_dense:
            return False
        if self.sparse_layers is not None:
            return index in self.sparse_layers
        return index % self.sparse_every_n == self.sparse_every_n - 1

    @property
    def head_dim(self) -> int:
        """Query/key/value head width of gqa attention."""
        return self.attention.head_dim or self.d_model // self.n_heads

    @property
    def rope_dim(self) -> int:
        """Width of the rotary-embedded part of each query/key head."""
        return self.attention.qk_rope_head_dim if self.attention.kind == "mla" else self.head_dim

    def sliding_window(self, index: int) -> int | None:
        """The attention window of block `index` (None: causal over the whole prefix)."""
        layers = self.attention.sliding_layers
        return self.attention.sliding_window if layers is None or index in layers else None


@dataclass
class MoEConfig(Section):
    num_experts: int = option(8, "routed experts per MoE layer")
    expert_hidden: int = option(256, "hidden width of each routed expert (SwiGLU)")
    num_shared_experts: int = option(0, "always-on shared experts beside the routed ones (DeepSeekMoE)")
    shared_expert_hidden: int | None = option(None, "hidden width of each shared expert; null = expert_hidden")
    shared_expert_gate: bool = option(
        False, "scale the shared experts' output by sigmoid(<g, x>), a learned gate per token (Qwen2-MoE)"
    )
    expert_activation: Literal["swiglu", "gpt_oss"] = option(
        "swiglu",
        "routed experts' activation: silu(gate) * up, or gpt-oss's (up + 1) * g * sigmoid(alpha g), g = gate, "
        "with gate clamped above and up on both sides at expert_limit",
    )
    expert_alpha: float = option(1.702, "gpt_oss activation: the sigmoid's slope alpha")
    expert_limit: float = option(7.0, "gpt_oss activation: the clamp limit")
    expert_bias: bool = option(False, "biases on the routed experts' gate/up and down projections (gpt-oss)")
    zero_experts: int = option(0, "MoE++ zero-computation experts that output 0 (routed like any expert; no FLOPs)")
    copy_experts: int = option(0, "MoE++ zero-computation experts that output their input")
    constant_experts: int = option(
        0, "MoE++ experts that output a1 x + a2 v: a learned vector v, (a1, a2) = softmax(W x), W a learned 2 x D"
    )
    gating_residual: bool = option(
        False,
        "MoE++ gating residuals: each MoE layer after the first adds the previous MoE layer's router logits, "
        "through a learned square projection (zero at the start), to its own",
    )
    capacity_factor: float | None = option(
        None,
        "expert capacity = ceil(factor * tokens * top_k / num_experts); null = dropless (router.type="
        "expert_choice: the per-sequence capacity, null = 1)",
    )
    drop_policy: Literal["position", "probability"] = option(
        "position", "over capacity, keep earliest tokens (position) or highest router probability"
    )
    kernel_backend: Literal["auto", "triton", "torch", "grouped_mm", "reference"] = option(
        "auto",
        "expert-compute kernels: auto = triton on CUDA, torch elsewhere; grouped_mm = torch._grouped_mm "
        "(CUDA: bf16, compute capability >= 8.0); reference = per-expert loop",
    )

    def validate(self) -> None:
        _positive(self, "num_experts", "expert_hidden", "shared_expert_hidden")
        _non_negative(self, "num_shared_experts", "zero_experts", "copy_experts", "constant_experts")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ConfigError("capacity_factor", f"must be > 0, or null for dropless, got {self.capacity_factor}")
        if self.shared_expert_gate and not self.num_shared_experts:
            raise ConfigError("shared_expert_gate", "gates the shared experts: set moe.num_shared_experts > 0")


@dataclass
class RouterConfig(Section):
    type: Literal["topk", "sinkhorn", "selective_sinkhorn", "expert_choice", "relu", "random", "topk_softmax"] = option(
        "topk",
        "router kind: topk = token choice, each token picks its top_k experts; sinkhorn = in training, the top_k "
        "of a Sinkhorn-balanced transport plan over the data-parallel batch (plain top-k in evaluation); "
        "selective_sinkhorn = softmax top-k, except on a fraction router.sinkhorn_fraction of the training steps, "
        "spread evenly, where the experts and their weights come from the transport plan, differentiably; "
        "expert_choice = each expert takes its best ceil(capacity * seq_len * top_k / num_experts) tokens of "
        "every sequence (capacity = moe.capacity_factor, null = 1): sees future tokens of the sequence, which "
        "leaks them in a causal LM, in training and evaluation alike (a baseline, not a deployable router); "
        "relu = BlockFFN: RMSNorm(ReLU(W x)), every expert with a non-zero activation, weighted by it; "
        "random = a frozen random projection picks top_k experts, weighted equally (a control: no learned "
        "router); topk_softmax: topk's old name",
    )
    sinkhorn_iters: int = option(8, "Sinkhorn iterations per routing (fixed: no host read to test convergence)")
    sinkhorn_fraction: float = option(
        0.25, "selective_sinkhorn: the fraction of training steps routed by the transport plan (1 = every step)"
    )
    top_k: int = option(2, "experts per token")
    bias: bool = option(False, "a learned bias on the router logits (gpt-oss)")
    score: Literal["softmax", "sigmoid"] = option(
        "softmax", "expert scores: softmax over the experts, or an independent sigmoid per expert (DeepSeek-V3)"
    )
    renormalize: bool = option(True, "renormalise the top-k weights to sum to 1 (Mixtral; DeepSeek-V3 with sigmoid)")
    scaling_factor: float = option(1.0, "multiplies the routing weights (DeepSeek-V3's routed scaling factor)")
    num_groups: int | None = option(
        None, "group-limited routing: experts in this many equal groups (the EP ranks, to bound a token's peers)"
    )
    group_top_k: int | None = option(
        None, "groups each token may use; a group's score is the sum of its top top_k/group_top_k expert scores"
    )
    tls_coef: float = option(
        0.0, "relu router: weight of the token-level sparsity objective (mean L1 of the normalised activations / E)"
    )
    cls_coef: float = option(
        0.0,
        "relu router: weight of the chunk-level sparsity objective (mean over chunks and experts of the soft "
        "probability that any token of the chunk activates the expert)",
    )
    chunk_size: int = option(8, "relu router: consecutive tokens of a chunk, for chunk-level sparsity (CLS)")
    collapse_share: float = option(
        0.5, "warn (once per layer) when one expert takes more than this share of a layer's assignments ..."
    )
    collapse_entropy: float = option(
        0.25, "... or the entropy of the layer's expert load falls below this fraction of log(num_experts) ..."
    )
    collapse_steps: int = option(3, "... at this many logged steps in a row")
    bias_update_rate: float = option(
        0.0,
        "aux-loss-free balancing: after each step, expert bias += rate * sign(mean load - load), loads over the "
        "global batch; the bias shifts selection only, never the weights (0 = off)",
    )
    combine: Literal["weights", "unit"] = option(
        "weights",
        "how selected experts' outputs add up: weighted by the router, or unit (each weight exactly 1, "
        "straight-through to the router: neuron-partition upcycling sums to the dense FFN)",
    )
    aux_loss_coef: float = option(0.01, "weight of the load-balancing loss N_E * sum f_i p_i")
    z_loss_coef: float = option(0.001, "weight of the router z-loss mean(logsumexp(logits)^2)")
    balance_scope: Literal["micro_batch", "sequence", "global_batch"] = option(
        "micro_batch",
        "tokens over which expert fractions f_i are counted for the balancing loss; global_batch = all "
        "data-parallel ranks and the step's micro-batches so far (p_i stays local)",
    )

    def validate(self) -> None:
        _positive(self, "top_k")
        _non_negative(self, "aux_loss_coef", "z_loss_coef", "bias_update_rate", "tls_coef", "cls_coef")
        _positive(self, "collapse_steps", "sinkhorn_iters", "chunk_size")
        if self.type not in ("topk", "topk_softmax") and (self.num_groups is not None or self.bias_update_rate > 0):
            raise ConfigError(
                "type", f"router.num_groups and router.bias_update_rate apply to router.type=topk, not {self.type}"
            )
        if not 0 < self.sinkhorn_fraction <= 1:
            raise ConfigError("sinkhorn_fraction", f"must be in (0, 1], got {self.sinkhorn_fraction}")
        if self.type != "relu" and (self.tls_coef or self.cls_coef):
            raise ConfigError("tls_coef", f"the sparsity objectives apply to router.type=relu, not {self.type}")
        if self.type in ("relu", "random", "selective_sinkhorn") and self.score != "softmax":
            raise ConfigError("score", f"router.type={self.type} has its own weights: router.score does not apply")
        for name in ("collapse_share", "collapse_entropy"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(name, f"must be in (0, 1], got {getattr(self, name)}")
        if self.type == "topk_softmax":
            warnings.warn("router.type=topk_softmax is deprecated: use router.type=topk", FutureWarning, stacklevel=2)
        if self.scaling_factor <= 0:
            raise ConfigError("scaling_factor", f"must be > 0, got {self.scaling_factor}")
        if (self.num_groups is None) != (self.group_top_k is None):
            raise ConfigError(
                "group_top_k", "group-limited routing needs both router.num_groups and router.group_top_k"
            )
        if self.num_groups is not None:
            _positive(self, "num_groups", "group_top_k")
            if self.group_top_k > self.num_groups:
                raise ConfigError(
                    "group_top_k", f"must be <= router.num_groups ({self.num_groups}), got {self.group_top_k}"
                )
            if self.top_k % self.group_top_k:
                raise ConfigError("group_top_k", f"must divide router.top_k ({self.top_k}), got {self.group_top_k}")
        if self.score == "sigmoid" and self.top_k == 1 and self.renormalize:
            raise ConfigError(
                "renormalize",
                "with router.score=sigmoid and top_k=1 every weight would be exactly 1 and the router untrained; "
                "set router.renormalize=false",
            )
        if self.top_k == 1 and self.renormalize and self.combine == "weights":
            # p_i / p_i = 1: the LM loss sends the router no gradient, only the auxiliary losses
            # train it, and routing stays near random (measured: docs/benchmarks.md, sweeps)
            warnings.warn(
                "router.top_k=1 with router.renormalize=true gives every token weight 1: the router gets no "
                "gradient from the loss; set router.renormalize=false (Switch-style) to train it",
                stacklevel=2,
            )


MAX_FFF_DEPTH = 20


@dataclass
class FFFConfig(Section):
    depth: int = option(3, "tree depth d: 2^d - 1 node neurons, 2^d leaves")
    leaf_width: int = option(64, "hidden width of each leaf FFN")
    leaf_activation: Literal["swiglu", "gelu"] = option("swiglu", "leaf FFN kind")
    mode: Literal["soft", "topk_paths", "hard"] = option(
        "hard",
        "training: soft = every leaf weighted by its path probability; topk_paths = the top_k most probable "
        "leaves, renormalised; hard = the descent's leaf, straight-through gradient to the nodes",
    )
    top_k: int = option(2, "leaves per token in topk_paths mode")
    combine: Literal["weights", "unit"] = option(
        "weights",
        "topk_paths: the selected leaves weighted by renormalised path probability, or unit (each weight "
        "exactly 1, straight-through: a tree carved out of a dense FFN sums to it with every leaf selected)",
    )
    balance_coef: float = option(0.01, "weight of the leaf load-balancing loss L * sum f_i p_i (0 = off)")
    balance_scope: Literal["micro_batch", "sequence", "global_batch"] = option(
        "micro_batch", "tokens over which leaf fractions f_i are counted, as router.balance_scope"
    )
    hardening_coef: float = option(0.0, "weight of the hardening loss: mean entropy (nats) of the node decisions")
    master_leaf: bool = option(False, "an always-on leaf blended with the tree output by a trained coefficient")
    master_leaf_width: int | None = option(None, "hidden width of the master leaf; null = leaf_width")
    node_lr_scale: float = option(1.0, "learning rate of the node neurons relative to optimizer.lr")
    kernel_backend: Literal["auto", "triton", "torch", "grouped_mm", "reference"] = option(
        "auto", "leaf-compute kernels in training (as moe.kernel_backend)"
    )
    inference_backend: Literal["auto", "cpp", "torch"] = option(
        "auto",
        "hard descent at evaluation: cpp = fused C++ kernel built on first use (CPU, fp32); auto = cpp "
        "when it applies and builds, torch otherwise",
    )

    @property
    def num_leaves(self) -> int:
        return 2**self.depth

    def validate(self) -> None:
        if not 1 <= self.depth <= MAX_FFF_DEPTH:
            raise ConfigError("depth", f"must be in [1, {MAX_FFF_DEPTH}], got {self.depth}")
        _positive(self, "leaf_width", "master_leaf_width", "node_lr_scale")
        _non_negative(self, "balance_coef", "hardening_coef")
        if not 1 <= self.top_k <= self.num_leaves:
            raise ConfigError("top_k", f"must be in [1, 2^depth = {self.num_leaves}], got {self.top_k}")
        if self.combine == "unit" and self.mode == "soft":
            raise ConfigError("combine", "unit applies to topk_paths (hard is always unit); soft weights every leaf")


# The built-in corpus's domains (sparse_train.data.domains): no download on any machine with Python.
BUILTIN_DOMAINS = ("code", "prose", "headers")


@dataclass
class DataSource(Section):
    """One named source of a data mixture."""

    name: str = option("", "the source's name in metrics (val_loss/<name>, per-domain routing)")
    path: str | None = option(None, "as data.path accepts (read with data.format, data.text_field); null with builtin")
    builtin: str | None = option(
        None, "a built-in domain instead of a path: " + ", ".join(BUILTIN_DOMAINS) + " (docs/data.md)"
    )
    weight: float = option(1.0, "share of the training tokens drawn from this source, relative to the others")

    def validate(self) -> None:
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError("name", f"must be a non-empty name of letters, digits, - and _, got {self.name!r}")
        if (self.path is None) == (self.builtin is None):
            raise ConfigError("path", f"source {self.name!r} needs exactly one of path and builtin")
        if self.builtin is not None and self.builtin not in BUILTIN_DOMAINS:
            raise ConfigError("builtin", f"must be one of {', '.join(BUILTIN_DOMAINS)}, got {self.builtin!r}")
        _positive(self, "weight")


@dataclass
class DataConfig(Section):
    """Where the corpus and tokenizer are. Validation reads no files: the paths are checked where
    they are read (data/dataset.py, data/tokenizer.py), so a run copied to a machine without its
    training data still evaluates and generates."""

    path: str | None = option(
        None, "text file/dir, .jsonl, or pre-tokenised .bin; null = the Python standard library sources"
    )
    format: Literal["auto", "text", "jsonl", "bin"] = option("auto", "how to read data.path")
    text_field: str = option("text", "JSONL field holding each document's text")
    bin_dtype: Literal["uint16", "uint32"] = option("uint16", "token dtype of a .bin memmap")
    tokenizer: Literal["byte", "hf"] = option(
        "byte", "byte = byte-level (256 bytes + specials); hf = a Hugging Face tokenizer from data.tokenizer_path"
    )
    tokenizer_path: str | None = option(
        None, "directory with the HF tokenizer files (tokenizer.json, tokenizer_config.json) for tokenizer: hf"
    )
    seq_len: int = option(128, "tokens per training sequence")
    val_fraction: float = option(0.02, "fraction of documents (or of a .bin's tail) held out for validation")
    mixture: list[DataSource] = option(
        factory=list,
        help="named sources mixed by weight instead of data.path (each: name, path or builtin, weight); "
        "validation loss and routing are reported per source",
    )

    def validate(self) -> None:
        _positive(self, "seq_len")
        if self.mixture and self.path is not None:
            raise ConfigError("mixture", "data.mixture replaces data.path: set one of them")
        names = [source.name for source in self.mixture]
        if len(set(names)) != len(names):
            raise ConfigError("mixture", f"source names must be unique, got {names}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError("val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        if self.tokenizer == "hf" and self.tokenizer_path is None:
            raise ConfigError("tokenizer_path", "tokenizer: hf needs the directory of the tokenizer files")


@dataclass
class OptimizerConfig(Section):
    lr: float = option(3e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = option(0.1, "final learning rate as a fraction of lr (cosine schedule)")
    schedule: Literal["cosine", "constant"] = option("cosine", "decay after the linear warmup")
    warmup_steps: int = option(20, "linear warmup steps")
    weight_decay: float = option(0.1, "decay of all matrices (embeddings, routers, FFF nodes too); not norms or biases")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    eps: float = option(1e-8, "AdamW epsilon")
    grad_clip: float | None = option(1.0, "clip the global gradient norm to this; null = no clipping")

    def validate(self) -> None:
        _positive(self, "lr", "eps", "grad_clip")
        _non_negative(self, "warmup_steps", "weight_decay")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(name, f"must be in [0, 1), got {getattr(self, name)}")


@dataclass
class TrainConfig(Section):
    steps: int = option(300, "optimizer steps")
    seed: int = option(0, "seed for initialisation and data order")
    batch_size: int = option(16, "sequences per micro-batch")
    grad_accum: int = option(1, "micro-batches accumulated per optimizer step")
    log_every: int = option(10, "steps between metrics records")
    eval_every: int = option(100, "steps between validation runs (0 = only at the end)")
    eval_batches: int = option(8, "micro-batches per validation run")
    precision: Literal["fp32", "bf16"] = option("fp32", "fp32, or bf16 autocast with fp32 master weights")
    device: Literal["auto", "cpu", "cuda"] = option("auto", "auto = cuda when available, else cpu")
    max_nonfinite_steps: int = option(5, "stop after this many non-finite steps in a row")
    activation_checkpointing: Literal["none", "all", "sparse", "dense"] = option(
        "none",
        "recompute blocks' activations in the backward instead of keeping them: none, all blocks, only the "
        "sparse (MoE/FFF) blocks, or only the dense ones",
    )

    def validate(self) -> None:
        _positive(self, "steps", "batch_size", "grad_accum", "log_every", "eval_batches")
        _positive(self, "max_nonfinite_steps")
        _non_negative(self, "eval_every", "seed")


@dataclass
class CheckpointConfig(Section):
    every: int = option(100, "steps between checkpoints (0 = only the final one)")
    keep: int = option(3, "complete checkpoints kept; older ones are deleted")
    save_final: bool = option(True, "write a checkpoint when training ends")
    # Named async_save: `async` is a Python keyword, so it cannot be a field (and keys are field names).
    async_save: bool = option(
        False,
        "write checkpoints in the background (DCP async_save): training goes on while the shards are "
        "written; each is published once complete, the next save and the end of training wait for it; "
        "costs a CPU copy of the rank's state while it is written",
    )

    def validate(self) -> None:
        _non_negative(self, "every")
        _positive(self, "keep")


@dataclass
class LoggingConfig(Section):
    tensorboard: bool = option(True, "write TensorBoard events under RUN_DIR/tb")
    progress: bool = option(True, "show a progress bar")
    plots: bool = option(True, "write PNG plots (loss curve, expert-load heatmap) under RUN_DIR/plots")


@dataclass
class ParallelConfig(Section):
    dp_replicate: int = option(1, "data-parallel replicas (parameters replicated, gradients all-reduced)")
    dp_shard: int = option(
        -1, "data-parallel shards (FSDP2: parameters, gradients and optimizer state sharded); -1 = the remaining ranks"
    )
    ep: int = option(1, "expert-parallel degree; borrows ranks from the data-parallel ones (parallel folding)")
    tp: int = option(1, "tensor-parallel degree (attention heads, dense FFN and expert hidden widths)")
    pp: int = option(
        1, "pipeline-parallel degree (blocks split into pp stages, 1F1B over train.grad_accum micro-batches)"
    )
    ep_dispatcher: Literal["alltoall", "allgather"] = option(
        "alltoall", "how tokens reach their experts' ranks: uneven all-to-all, or all-gather for small EP groups"
    )
    ep_dedup: bool = option(
        True, "all-to-all: send a token once per destination rank, however many of its experts are there"
    )
    grad_sync: Literal["step", "micro_batch"] = option(
        "step",
        "when FSDP reduce-scatters gradients under accumulation: once per step (unsharded gradients kept "
        "between micro-batches: less traffic, more memory) or after every micro-batch (sharded gradients)",
    )

    def validate(self) -> None:
        _positive(self, "dp_replicate", "ep", "tp", "pp")
        if self.dp_shard == 0 or self.dp_shard < -1:
            raise ConfigError("dp_shard", f"must be > 0, or -1 for the remaining ranks, got {self.dp_shard}")
        if self.grad_sync == "micro_batch" and self.pp > 1:
            raise ConfigError("grad_sync", "micro_batch needs pp=1: the pipeline schedule reduces once per step")


@dataclass
class Config(Section):
    model: ModelConfig = option(factory=ModelConfig, help="the decoder LM")
    moe: MoEConfig = option(factory=MoEConfig, help="MoE layers")
    router: RouterConfig = option(factory=RouterConfig, help="MoE routing and its losses")
    fff: FFFConfig = option(factory=FFFConfig, help="FFF tree layers (model.ffn: fff)")
    data: DataConfig = option(factory=DataConfig, help="corpus, tokenizer, split")
    optimizer: OptimizerConfig = option(factory=OptimizerConfig, help="AdamW and schedule")
    train: TrainConfig = option(factory=TrainConfig, help="the training loop")
    checkpoint: CheckpointConfig = option(factory=CheckpointConfig, help="checkpoint cadence")
    logging: LoggingConfig = option(factory=LoggingConfig, help="metrics outputs")
    parallel: ParallelConfig = option(factory=ParallelConfig, help="parallel layout (degrees)")

    def validate(self) -> None:
        choices = self.moe.num_experts + self.moe.zero_experts + self.moe.copy_experts + self.moe.constant_experts
        if self.model.ffn == "moe" and self.router.top_k > choices:
            what = f"moe.num_experts ({choices})"
            if choices > self.moe.num_experts:
                what = f"moe.num_experts plus the zero-computation experts ({choices})"
            raise ConfigError("router.top_k", f"must be <= {what}, got {self.router.top_k}")
        if self.moe.gating_residual and self.model.ffn != "moe":
            raise ConfigError("moe.gating_residual", "adds router logits between MoE layers: needs model.ffn=moe")
        if choices > self.moe.num_experts and self.router.num_groups is not None:
            raise ConfigError(
                "router.num_groups", "group-limited routing groups the FFN experts: no zero-computation experts"
            )
        groups = self.router.num_groups
        if self.model.ffn == "moe" and groups is not None and self.moe.num_experts % groups:
            raise ConfigError(
                "router.num_groups", f"must divide moe.num_experts ({self.moe.num_experts}), got {groups}"
            )
        if self.model.ffn == "moe" and groups is not None:
            per_group, scored = self.moe.num_experts // groups, self.router.top_k // self.router.group_top_k
            if per_group < scored:  # a group's score sums its best top_k/group_top_k experts
                raise ConfigError(
                    "router.num_groups",
                    f"leaves {per_group} experts per group, fewer than router.top_k / router.group_top_k "
                    f"({scored}) that score a group; got {groups}",
                )
        if self.model.ffn == "moe" and self.router.type == "relu" and self.moe.capacity_factor is not None:
            raise ConfigError("moe.capacity_factor", "router.type=relu picks a variable number of experts: no capacity")
        if self.model.mtp_depth and self.parallel.pp > 1:
            raise ConfigError(
                "model.mtp_depth", "multi-token prediction under pipeline parallelism is not supported yet (pp=1)"
            )
        if self.model.mtp_depth >= self.data.seq_len:
            raise ConfigError(
                "model.mtp_depth", f"must be < data.seq_len ({self.data.seq_len}), got {self.model.mtp_depth}"
            )
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(
                "data.seq_len",
                f"must be <= model.max_seq_len ({self.model.max_seq_len}), got {self.data.seq_len}",
            )

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The sections of a YAML recipe, as a mapping (an empty file is an empty mapping)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("--config", f"no such file: {path}")
    try:
        loaded = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError("--config", f"{path} is not valid YAML{where}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError("--config", f"{path} must hold a mapping of sections")
    return loaded or {}


def compose_config(data: Mapping[str, Any] | None = None, overrides: Sequence[str] = ()) -> Config:
    """The one way a Config is made: the defaults, then `data` (sections as in a YAML recipe or a
    checkpoint's config.yaml), then `overrides` (`a.b=value`, applied in order), then validation."""
    data = copy.deepcopy(dict(data or {}))  # overrides edit the mapping; the caller's stays as it was
    _move_renamed_keys(data)
    for text in overrides:
        parts, value = parse_override(text)
        apply_override(data, Config, _renamed_path(parts), value)
    return from_dict(Config, data)


# Keys that moved, old -> new. Configs and checkpoints that use the old names keep working, with
# a warning: both place FFF layers as well as MoE ones, so they belong to the model section.
RENAMED_KEYS = {
    ("moe", "every_n"): ("model", "sparse_every_n"),
    ("moe", "layers"): ("model", "sparse_layers"),
}


def _warn_renamed(old: tuple[str, str], new: tuple[str, str]) -> None:
    warnings.warn(f"{'.'.join(old)} is deprecated: use {'.'.join(new)}", FutureWarning, stacklevel=4)


def _move_renamed_keys(data: dict[str, Any]) -> None:
    for old, new in RENAMED_KEYS.items():
        section = data.get(old[0])
        if not isinstance(section, dict) or old[1] not in section:
            continue
        _warn_renamed(old, new)
        value = section.pop(old[1])
        target = data.setdefault(new[0], {})
        if not isinstance(target, dict):
            continue  # from_dict names the section that is not a mapping
        if new[1] in target and target[new[1]] != value:
            raise ConfigError(".".join(old), f"is deprecated and conflicts with {'.'.join(new)}; keep only the latter")
        target[new[1]] = value


def _renamed_path(parts: list[str]) -> list[str]:
    new = RENAMED_KEYS.get(tuple(parts[:2]))
    if new is None or len(parts) != 2:
        return parts
    _warn_renamed((parts[0], parts[1]), new)
    return list(new)


def load_config(path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML recipe (or the defaults when `path` is None) and apply `a.b=value` overrides."""
    return compose_config(read_config_file(path) if path is not None else None, overrides)
