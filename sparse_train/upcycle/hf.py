"""Hugging Face checkpoints <-> sparse_train models: read and write local HF directories.

Read (no `transformers` needed: config.json and safetensors are read directly):
    LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM     dense, SwiGLU, RMSNorm, rotary
    MixtralForCausalLM, Qwen2MoeForCausalLM                     their MoE counterparts
Write (`transformers` builds the config, so the directory loads with `from_pretrained`):
    dense   -> Llama (Qwen2 when the model has q/k/v biases)
    MoE     -> Mixtral when it maps exactly (no shared experts, renormalised top-k, no q/k/v
               biases, every block MoE), else Qwen2-MoE (q/k/v biases, dense blocks via
               `mlp_only_layers`, top-k renormalisation via `norm_topk_prob`, shared experts)

Tensors map 1:1 (decision 5): nn.Linear weights are [out, in]; our stacked experts are
[E, in, ...] and are written per expert under the files' per-expert keys (w1/w2/w3 for
Mixtral, gate/up/down_proj for Qwen2-MoE). Importing then exporting reproduces every tensor
exactly (tests).

Shape legend: E experts, D model width, F expert (or FFN) hidden width.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sparse_train.config import Config, ConfigError, compose_config
from sparse_train.lazy import LazyTensor, Stacked, Transposed, read_safetensors_index

DENSE_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
MOE_ARCHS = ("MixtralForCausalLM", "Qwen2MoeForCausalLM")
SUPPORTED = DENSE_ARCHS + MOE_ARCHS
MAX_ROPE_TABLE = 8192  # rotary table rows we build; positions beyond it are refused at run time


class HFFormatError(ConfigError):
    """A local HF directory that cannot be converted: the message says which file and why."""

    def __init__(self, message: str) -> None:
        super().__init__("--from", message)


@dataclass
class HFCheckpoint:
    path: Path
    arch: str
    hf_config: dict[str, Any]
    tensors: dict[str, LazyTensor]  # read by region on demand (sparse_train.lazy)


# ---- reading ----------------------------------------------------------------------------------
def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise HFFormatError(f"{index} is not a valid safetensors index") from None
        files = sorted({path / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise HFFormatError(f"{path}: shards named in the index are missing: {', '.join(missing)}")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise HFFormatError(f"{path}: no model.safetensors or model.safetensors.index.json (only safetensors are read)")


def read_hf(path: Path) -> HFCheckpoint:
    """config.json and every tensor of a local HF directory, by reference: the shards' headers are
    read and their sizes checked here, the data only when a tensor (or a region of it) is read."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise HFFormatError(f"{path}: no config.json (is this a Hugging Face model directory?)")
    try:
        hf_config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise HFFormatError(f"{config_file} is not valid JSON ({err.msg} at line {err.lineno})") from None
    archs = hf_config.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED), None)
    if arch is None:
        raise HFFormatError(
            f"{path}: architecture {archs or 'unknown'} is not supported; supported: {', '.join(SUPPORTED)}"
        )
    tensors: dict[str, LazyTensor] = {}
    for file in _weight_files(path):
        try:
            tensors.update(read_safetensors_index(file))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise HFFormatError(f"{file.name} is corrupt or truncated ({str(err).splitlines()[0]})") from None
    return HFCheckpoint(path, arch, hf_config, tensors)


def _rope_theta(c: dict[str, Any]) -> float:
    params = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise HFFormatError(f"rope type {rope_type!r} is not supported (only the default rotary embedding)")
    return float(params.get("rope_theta", c.get("rope_theta", 10000.0)))


def native_config(ckpt: HFCheckpoint, base: Config | None = None) -> Config:
    """The sparse_train config of an HF checkpoint's model (other sections from `base`)."""
    c, arch = ckpt.hf_config, ckpt.arch
    if c.get("hidden_act", "silu") != "silu":
        raise HFFormatError(f"hidden_act {c.get('hidden_act')!r} is not supported (SwiGLU with silu only)")
    heads = int(c["num_attention_heads"])
    head_dim = c.get("head_dim")
    if head_dim not in (None, c["hidden_size"] // heads):
        raise HFFormatError(f"head_dim {head_dim} != hidden_size / num_attention_heads is not supported")
    if c.get("attention_bias"):
        raise HFFormatError("attention_bias (a bias on o_proj too) is not supported; Qwen2's q/k/v biases are")
    if c.get("use_sliding_window"):
        raise HFFormatError("use_sliding_window is not supported")
    max_seq = min(int(c.get("max_position_embeddings", 4096)), MAX_ROPE_TABLE)
    if c.get("sliding_window"):  # Mistral: full attention within the window, so cap the length there
        max_seq = min(max_seq, int(c["sliding_window"]))
    data = base.to_dict() if base is not None else {}
    model = {
        "vocab_size": int(c["vocab_size"]),
        "d_model": int(c["hidden_size"]),
        "n_layers": int(c["num_hidden_layers"]),
        "n_heads": heads,
        "n_kv_heads": int(c.get("num_key_value_heads") or heads),
        "ffn_hidden": int(c.get("intermediate_size", 4 * c["hidden_size"])),
        "max_seq_len": max_seq,
        "rope_theta": _rope_theta(c),
        "norm_eps": float(c.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(c.get("tie_word_embeddings", False)),
        "qkv_bias": arch.startswith("Qwen2"),
        "ffn": "dense",
    }
    data["model"] = {**data.get("model", {}), **model}
    if arch in MOE_ARCHS:
        data["model"]["ffn"] = "moe"
        data["moe"], data["router"], sparse_layers = _moe_sections(c, arch, data)
        data["model"].update(sparse_layers=sparse_layers, sparse_every_n=1)
    data.setdefault("data", {})["seq_len"] = min(data.get("data", {}).get("seq_len", 128), max_seq)
    return compose_config(data)


def _moe_sections(c: dict[str, Any], arch: str, data: dict[str, Any]) -> tuple[dict, dict, list[int] | None]:
    """The moe and router sections of an HF MoE config, and its MoE blocks (None: every block)."""
    moe, router = dict(data.get("moe", {})), dict(data.get("router", {}))
    if arch == "MixtralForCausalLM":
        moe.update(
            num_experts=int(c["num_local_experts"]),
            expert_hidden=int(c["intermediate_size"]),
            num_shared_experts=0,
        )
        router.update(top_k=int(c["num_experts_per_tok"]), renormalize=True)
        return moe, router, None
    n_layers = int(c["num_hidden_layers"])
    dense = set(c.get("mlp_only_layers") or [])
    step = int(c.get("decoder_sparse_step", 1))
    sparse = [i for i in range(n_layers) if i not in dense and (i + 1) % step == 0]
    shared = int(c.get("shared_expert_intermediate_size") or 0)
    moe.update(
        num_experts=int(c["num_experts"]),
        expert_hidden=int(c["moe_intermediate_size"]),
        num_shared_experts=1 if shared else 0,
        shared_expert_hidden=shared or None,
        shared_expert_gate=bool(shared),
    )
    router.update(top_k=int(c["num_experts_per_tok"]), renormalize=bool(c.get("norm_topk_prob", False)))
    return moe, router, sparse


# ---- tensor names -----------------------------------------------------------------------------
def _attn_pairs(i: int, qkv_bias: bool) -> list[tuple[str, str]]:
    hf, nat = f"model.layers.{i}", f"blocks.{i}"
    pairs = [
        (f"{nat}.attn_norm.weight", f"{hf}.input_layernorm.weight"),
        (f"{nat}.ffn_norm.weight", f"{hf}.post_attention_layernorm.weight"),
    ]
    for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
        pairs.append((f"{nat}.attn.{ours}.weight", f"{hf}.self_attn.{theirs}.weight"))
        if qkv_bias and ours != "wo":
            pairs.append((f"{nat}.attn.{ours}.bias", f"{hf}.self_attn.{theirs}.bias"))
    return pairs


def _swiglu_pairs(nat: str, hf: str, names: tuple[str, str, str]) -> list[tuple[str, str]]:
    gate, up, down = names
    return [
        (f"{nat}.w_gate.weight", f"{hf}.{gate}.weight"),
        (f"{nat}.w_up.weight", f"{hf}.{up}.weight"),
        (f"{nat}.w_down.weight", f"{hf}.{down}.weight"),
    ]


def _moe_prefix(arch: str, i: int) -> str:
    return f"model.layers.{i}.block_sparse_moe" if arch == "MixtralForCausalLM" else f"model.layers.{i}.mlp"


def _expert_names(arch: str) -> tuple[str, str, str]:
    return ("w1", "w3", "w2") if arch == "MixtralForCausalLM" else ("gate_proj", "up_proj", "down_proj")


def to_native(ckpt: HFCheckpoint, cfg: Config) -> dict[str, LazyTensor]:
    """The native state dict of an HF checkpoint (cfg from native_config), by reference: each
    entry reads (a region of) its HF tensors when read."""
    t, m = ckpt.tensors, cfg.model
    used: set[str] = set()

    def take(name: str) -> LazyTensor:
        if name not in t:
            raise HFFormatError(f"{ckpt.path}: tensor {name} is missing from the weights")
        used.add(name)
        return t[name]

    state = {"embed.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    state["lm_head.weight"] = state["embed.weight"] if m.tie_embeddings else take("lm_head.weight")
    if m.tie_embeddings and "lm_head.weight" in t:
        used.add("lm_head.weight")
    for i in range(m.n_layers):
        for ours, theirs in _attn_pairs(i, m.qkv_bias):
            state[ours] = take(theirs)
        if m.ffn == "moe" and m.is_sparse_layer(i):
            state.update(_experts_to_native(ckpt.arch, i, cfg, take))
        else:
            for ours, theirs in _swiglu_pairs(
                f"blocks.{i}.ffn", f"model.layers.{i}.mlp", ("gate_proj", "up_proj", "down_proj")
            ):
                state[ours] = take(theirs)
    unused = sorted(set(t) - used)
    if unused:
        raise HFFormatError(
            f"{ckpt.path}: tensors this model has no place for, e.g. {unused[0]} ({len(unused)} in all)"
        )
    return state


def _experts_to_native(arch: str, i: int, cfg: Config, take) -> dict[str, LazyTensor]:
    prefix, (w_gate, w_up, w_down) = _moe_prefix(arch, i), _expert_names(arch)
    E, nat = cfg.moe.num_experts, f"blocks.{i}.ffn"

    def expert(e: int, name: str) -> LazyTensor:  # [F, D] or [D, F], transposed to ours
        return Transposed(take(f"{prefix}.experts.{e}.{name}.weight"))

    # ours: w_gate_up[e, :, 0] = gate_e.T, w_gate_up[e, :, 1] = up_e.T, w_down[e] = down_e.T
    gate_up_ED2F = Stacked([Stacked([expert(e, w_gate), expert(e, w_up)], dim=1) for e in range(E)], dim=0)
    state = {
        f"{nat}.router.weight": take(f"{prefix}.gate.weight"),
        f"{nat}.experts.w_gate_up": gate_up_ED2F,
        f"{nat}.experts.w_down": Stacked([expert(e, w_down) for e in range(E)], dim=0),
    }
    if cfg.moe.num_shared_experts:
        for ours, theirs in _swiglu_pairs(
            f"{nat}.shared_experts", f"{prefix}.shared_expert", ("gate_proj", "up_proj", "down_proj")
        ):
            state[ours] = take(theirs)
        state[f"{nat}.shared_gate.weight"] = take(f"{prefix}.shared_expert_gate.weight")
    elif arch == "Qwen2MoeForCausalLM":  # a zero-width shared expert (our own exports write one)
        for name in _empty_shared_expert(prefix, 0, torch.float32):
            if take(name).numel() and not name.endswith("shared_expert_gate.weight"):
                raise HFFormatError(f"{name} is not empty but shared_expert_intermediate_size is 0")
    return state


# ---- writing ----------------------------------------------------------------------------------
def export_arch(cfg: Config) -> str:
    """The HF architecture a native model is written as (module docstring)."""
    m, moe = cfg.model, cfg.moe
    if m.ffn == "fff":
        raise ConfigError("--format", "FFF models have no Hugging Face architecture; keep --format native")
    if m.ffn == "dense":
        return "Qwen2ForCausalLM" if m.qkv_bias else "LlamaForCausalLM"
    if moe.capacity_factor is not None:
        raise ConfigError("moe.capacity_factor", "HF MoE blocks are dropless: export a model with capacity_factor null")
    for key in ("zero_experts", "copy_experts", "constant_experts", "gating_residual"):
        if getattr(moe, key):
            raise ConfigError(f"moe.{key}", "HF MoE formats cannot hold MoE++'s parts; keep --format native")
    if cfg.router.combine != "weights":
        raise ConfigError("router.combine", "HF MoE blocks weight experts by the router: export needs combine: weights")
    r = cfg.router
    if r.type not in ("topk", "topk_softmax", "sinkhorn", "selective_sinkhorn"):  # both Sinkhorns: top-k at inference
        raise ConfigError("router.type", f"{r.type} routing has no Hugging Face MoE format; keep --format native")
    for key, value, plain in (
        ("score", r.score, "softmax"),
        ("scaling_factor", r.scaling_factor, 1.0),
        ("num_groups", r.num_groups, None),
        ("bias_update_rate", r.bias_update_rate, 0.0),
    ):
        if value != plain:  # Mixtral and Qwen2-MoE route by a plain softmax top-k
            raise ConfigError(f"router.{key}", "the Mixtral and Qwen2-MoE formats cannot hold it; keep --format native")
    all_moe = all(m.is_sparse_layer(i) for i in range(m.n_layers))
    if all_moe and not moe.num_shared_experts and cfg.router.renormalize and not m.qkv_bias:
        return "MixtralForCausalLM"
    return "Qwen2MoeForCausalLM"


def hf_config_dict(cfg: Config, arch: str) -> dict[str, Any]:
    m, moe = cfg.model, cfg.moe
    common = {
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads or m.n_heads,
        "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps,
        "hidden_act": "silu",
        "tie_word_embeddings": m.tie_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
    }
    if arch in DENSE_ARCHS:
        return {**common, "intermediate_size": m.ffn_hidden}
    experts = {"num_experts_per_tok": cfg.router.top_k, "router_aux_loss_coef": cfg.router.aux_loss_coef}
    if arch == "MixtralForCausalLM":
        return {**common, **experts, "intermediate_size": moe.expert_hidden, "num_local_experts": moe.num_experts}
    dense_layers = [i for i in range(m.n_layers) if not m.is_sparse_layer(i)]
    shared = moe.num_shared_experts * (moe.shared_expert_hidden or moe.expert_hidden)
    return {
        **common,
        **experts,
        "intermediate_size": m.ffn_hidden,
        "moe_intermediate_size": moe.expert_hidden,
        "num_experts": moe.num_experts,
        "norm_topk_prob": cfg.router.renormalize,
        "decoder_sparse_step": 1,
        "mlp_only_layers": dense_layers,
        "shared_expert_intermediate_size": shared,
        "use_sliding_window": False,
    }


def _hf_outer(state: Mapping[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
    """The HF tensors outside the blocks: embeddings, final norm, output projection."""
    out = {"model.embed_tokens.weight": state["embed.weight"], "model.norm.weight": state["norm.weight"]}
    if not cfg.model.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    return _on_cpu(out)


def _hf_block(state: Mapping[str, torch.Tensor], cfg: Config, arch: str, i: int) -> dict[str, torch.Tensor]:
    """The HF tensors of block i (reads only block i's entries of `state`)."""
    out: dict[str, torch.Tensor] = {}
    qwen2 = arch.startswith("Qwen2")
    for ours, theirs in _attn_pairs(i, qwen2):
        # Qwen2 always has q/k/v biases: a model without them gets zeros (the same function)
        out[theirs] = state[ours] if ours in state else torch.zeros(state[ours.replace(".bias", ".weight")].shape[0])
    if cfg.model.ffn == "moe" and cfg.model.is_sparse_layer(i):
        out.update(_experts_from_native(arch, i, cfg, state))
    else:
        for ours, theirs in _swiglu_pairs(
            f"blocks.{i}.ffn", f"model.layers.{i}.mlp", ("gate_proj", "up_proj", "down_proj")
        ):
            out[theirs] = state[ours]
    return _on_cpu(out)


def _on_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def _experts_from_native(arch: str, i: int, cfg: Config, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix, (w_gate, w_up, w_down) = _moe_prefix(arch, i), _expert_names(arch)
    nat = f"blocks.{i}.ffn"
    w_ED2F, down_EFD = state[f"{nat}.experts.w_gate_up"], state[f"{nat}.experts.w_down"]
    out = {f"{prefix}.gate.weight": state[f"{nat}.router.weight"]}
    for e in range(cfg.moe.num_experts):
        out[f"{prefix}.experts.{e}.{w_gate}.weight"] = w_ED2F[e, :, 0].t()
        out[f"{prefix}.experts.{e}.{w_up}.weight"] = w_ED2F[e, :, 1].t()
        out[f"{prefix}.experts.{e}.{w_down}.weight"] = down_EFD[e].t()
    if cfg.moe.num_shared_experts:
        for ours, theirs in _swiglu_pairs(
            f"{nat}.shared_experts", f"{prefix}.shared_expert", ("gate_proj", "up_proj", "down_proj")
        ):
            out[theirs] = state[ours]
        if cfg.moe.shared_expert_gate:
            out[f"{prefix}.shared_expert_gate.weight"] = state[f"{nat}.shared_gate.weight"]
        else:  # Qwen2-MoE always gates: sigmoid(0) = 1/2 times a doubled down projection, exactly ours
            down = f"{prefix}.shared_expert.down_proj.weight"
            out[down] = out[down] * 2
            out[f"{prefix}.shared_expert_gate.weight"] = torch.zeros(1, w_ED2F.shape[1], dtype=w_ED2F.dtype)
    elif arch == "Qwen2MoeForCausalLM":  # Qwen2-MoE always has one: a zero-width one adds nothing
        out.update(_empty_shared_expert(prefix, w_ED2F.shape[1], w_ED2F.dtype))
    return out


def _empty_shared_expert(prefix: str, d_model: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.shared_expert.gate_proj.weight": torch.zeros(0, d_model, dtype=dtype),
        f"{prefix}.shared_expert.up_proj.weight": torch.zeros(0, d_model, dtype=dtype),
        f"{prefix}.shared_expert.down_proj.weight": torch.zeros(d_model, 0, dtype=dtype),
        f"{prefix}.shared_expert_gate.weight": torch.zeros(1, d_model, dtype=dtype),
    }


def write_hf(target: Path, state: Mapping[str, torch.Tensor], cfg: Config, tokenizer_from: Path | None = None) -> str:
    """Write an HF directory into `target` (which must not exist yet); returns the architecture.

    One safetensors file per block (and one for the embeddings, final norm and output
    projection) with the index HF reads them through: each file's tensors are read from `state`
    (converted, for an upcycled model) just before it is written, so writing holds one block."""
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            "--format", "writing Hugging Face directories needs transformers: pip install 'sparse_train[hf]'"
        ) from None
    arch = export_arch(cfg)
    config_cls = {
        "LlamaForCausalLM": "LlamaConfig",
        "Qwen2ForCausalLM": "Qwen2Config",
        "MixtralForCausalLM": "MixtralConfig",
        "Qwen2MoeForCausalLM": "Qwen2MoeConfig",
    }[arch]
    hf_config = getattr(transformers, config_cls)(**hf_config_dict(cfg, arch))
    hf_config.architectures = [arch]
    target.mkdir(parents=True)
    hf_config.save_pretrained(str(target))
    _write_shards(target, state, cfg, arch)
    if tokenizer_from is not None:
        copy_tokenizer(tokenizer_from, target)
    return arch


def _write_shards(target: Path, state: Mapping[str, torch.Tensor], cfg: Config, arch: str) -> None:
    parts: list[int | None] = [*range(cfg.model.n_layers), None]  # the blocks in order, then the rest
    weight_map: dict[str, str] = {}
    total = 0
    for n, part in enumerate(parts):
        tensors = _hf_outer(state, cfg) if part is None else _hf_block(state, cfg, arch, part)
        name = f"model-{n + 1:05d}-of-{len(parts):05d}.safetensors"
        save_file(tensors, str(target / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (target / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def copy_tokenizer(source: Path, target: Path) -> None:
    """The tokenizer files of `source` into `target` (created if needed)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            (target / name).write_bytes((source / name).read_bytes())


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
)
