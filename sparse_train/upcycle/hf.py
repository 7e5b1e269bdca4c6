"""Hugging Face checkpoints <-> sparse_train models: read and write local HF directories.

Read (no `transformers` needed: config.json and safetensors are read directly), write
(`transformers` builds the config, so the directory loads with `from_pretrained`):

    dense   Llama, Mistral (read), Qwen2, Qwen3
    MoE     Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, gpt-oss

The config mapping and the choice of architecture on export are in
sparse_train.upcycle.hf_config. Tensors map 1:1 (decision 5): nn.Linear weights are
[out, in]; our stacked experts are [E, in, ...] and are written per expert under the files'
per-expert keys (or, for gpt-oss, as its fused tensors with gate and up interleaved). Every
native tensor's shape is checked against the config's model on import. Importing then
exporting reproduces every tensor exactly (tests).

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

from sparse_train.config import Config, ConfigError, ModelConfig
from sparse_train.lazy import Deinterleaved, LazyTensor, Stacked, Transposed, read_safetensors_index
from sparse_train.upcycle.hf_config import (
    CONFIG_CLASSES,
    SUPPORTED,
    HFFormatError,
    attention_bias,
    export_arch,
    hf_config_dict,
    native_config,
)

__all__ = ["HFCheckpoint", "HFFormatError", "export_arch", "native_config", "read_hf", "to_native", "write_hf"]


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


# ---- tensor names -----------------------------------------------------------------------------
def _attn_pairs(i: int, m: ModelConfig, qkv_bias: bool, out_bias: bool) -> list[tuple[str, str]]:
    """(native, HF) names of block i's norms and attention tensors."""
    hf, nat = f"model.layers.{i}", native_block(m, i)
    pairs = [
        (f"{nat}.attn_norm.weight", f"{hf}.input_layernorm.weight"),
        (f"{nat}.ffn_norm.weight", f"{hf}.post_attention_layernorm.weight"),
    ]
    a = m.attention
    if a.kind == "mla":
        names = [("wq", "q_proj")] if a.q_lora_rank is None else [
            ("q_down", "q_a_proj"), ("q_norm", "q_a_layernorm"), ("q_up", "q_b_proj")
        ]  # fmt: skip
        names += [
            ("kv_down", "kv_a_proj_with_mqa"),
            ("kv_norm", "kv_a_layernorm"),
            ("kv_up", "kv_b_proj"),
            ("wo", "o_proj"),
        ]
        return pairs + [(f"{nat}.attn.{ours}.weight", f"{hf}.self_attn.{theirs}.weight") for ours, theirs in names]
    for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
        pairs.append((f"{nat}.attn.{ours}.weight", f"{hf}.self_attn.{theirs}.weight"))
        if out_bias if ours == "wo" else qkv_bias:
            pairs.append((f"{nat}.attn.{ours}.bias", f"{hf}.self_attn.{theirs}.bias"))
    if a.qk_norm != "none":
        pairs += [(f"{nat}.attn.{n}.weight", f"{hf}.self_attn.{n}.weight") for n in ("q_norm", "k_norm")]
    if a.sinks:
        pairs.append((f"{nat}.attn.sinks", f"{hf}.self_attn.sinks"))
    return pairs


def native_block(m: ModelConfig, i: int) -> str:
    """Our name of HF decoder layer i: a block, or (from n_layers on) the block of a multi-token
    prediction module (DeepSeek-V3 stores module k as layer n_layers + k)."""
    return f"blocks.{i}" if i < m.n_layers else f"mtp.{i - m.n_layers}.block"


def block_is_moe(m: ModelConfig, i: int) -> bool:
    """Whether HF layer i has an MoE FFN (an MTP module's block is like the last block)."""
    return m.ffn == "moe" and m.is_sparse_layer(min(i, m.n_layers - 1))


def _mtp_pairs(m: ModelConfig, i: int) -> list[tuple[str, str]]:
    """(native, HF) names of MTP module i - n_layers' own tensors (besides its block)."""
    nat, hf = f"mtp.{i - m.n_layers}", f"model.layers.{i}"
    names = (("enorm", "enorm"), ("hnorm", "hnorm"), ("proj", "eh_proj"), ("norm", "shared_head.norm"))
    return [(f"{nat}.{ours}.weight", f"{hf}.{theirs}.weight") for ours, theirs in names]


def _swiglu_pairs(nat: str, hf: str, names: tuple[str, str, str]) -> list[tuple[str, str]]:
    gate, up, down = names
    return [
        (f"{nat}.w_gate.weight", f"{hf}.{gate}.weight"),
        (f"{nat}.w_up.weight", f"{hf}.{up}.weight"),
        (f"{nat}.w_down.weight", f"{hf}.{down}.weight"),
    ]


PROJ_NAMES = ("gate_proj", "up_proj", "down_proj")


def _moe_prefix(arch: str, i: int) -> str:
    return f"model.layers.{i}.block_sparse_moe" if arch == "MixtralForCausalLM" else f"model.layers.{i}.mlp"


def _expert_names(arch: str) -> tuple[str, str, str]:
    return ("w1", "w3", "w2") if arch == "MixtralForCausalLM" else PROJ_NAMES


def _router_pairs(arch: str, i: int, cfg: Config) -> list[tuple[str, str]]:
    """(native, HF) names of block i's router: its weight, gpt-oss's logit bias, DeepSeek-V3's
    selection bias (our aux-loss-free expert bias)."""
    prefix, nat = _moe_prefix(arch, i), f"{native_block(cfg.model, i)}.ffn.router"
    gate = f"{prefix}.router" if arch == "GptOssForCausalLM" else f"{prefix}.gate"
    pairs = [(f"{nat}.weight", f"{gate}.weight")]
    if cfg.router.bias:
        pairs.append((f"{nat}.bias", f"{gate}.bias"))
    if arch == "DeepseekV3ForCausalLM":
        pairs.append((f"{nat}.expert_bias_E", f"{gate}.e_score_correction_bias"))
    return pairs


def _shared_pairs(arch: str, i: int, m: ModelConfig) -> list[tuple[str, str]]:
    hf = f"{_moe_prefix(arch, i)}.{'shared_experts' if arch == 'DeepseekV3ForCausalLM' else 'shared_expert'}"
    return _swiglu_pairs(f"{native_block(m, i)}.ffn.shared_experts", hf, PROJ_NAMES)


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
    for i in range(m.n_layers + m.mtp_depth):
        for ours, theirs in _attn_pairs(i, m, m.qkv_bias, m.attention.out_bias):
            state[ours] = take(theirs)
        if block_is_moe(m, i):
            state.update(_experts_to_native(ckpt.arch, i, cfg, take))
        else:
            for ours, theirs in _swiglu_pairs(f"{native_block(m, i)}.ffn", f"model.layers.{i}.mlp", PROJ_NAMES):
                state[ours] = take(theirs)
        if i >= m.n_layers:
            state.update({ours: take(theirs) for ours, theirs in _mtp_pairs(m, i)})
            # DeepSeek-V3 stores copies of the embedding and output head with each MTP module; the
            # modules use the model's own (as in training), so the copies are not read
            used.update(f"model.layers.{i}.{name}.weight" for name in ("embed_tokens", "shared_head.head"))
    unused = sorted(set(t) - used)
    if unused:
        raise HFFormatError(
            f"{ckpt.path}: tensors this model has no place for, e.g. {unused[0]} ({len(unused)} in all)"
        )
    _check_shapes(ckpt, cfg, state)
    return state


def _check_shapes(ckpt: HFCheckpoint, cfg: Config, state: Mapping[str, LazyTensor]) -> None:
    """Every native tensor has the shape the config's model has (built on the meta device: no memory)."""
    from sparse_train.models.transformer import Transformer

    with torch.device("meta"):
        expected = Transformer(cfg.model, cfg.moe, cfg.router, cfg.fff).state_dict()
    for name, tensor in expected.items():
        got = state[name].shape
        if tuple(got) != tuple(tensor.shape):
            raise HFFormatError(
                f"{ckpt.path}: {name} has shape {list(got)} but {ckpt.arch}'s config.json makes it "
                f"{list(tensor.shape)} (read from {_source_names(state[name])})"
            )


def _source_names(t: LazyTensor) -> str:
    """The HF tensor names a native lazy tensor reads (for error messages)."""
    if isinstance(t, Stacked):
        return _source_names(t.items[0]) + (", ..." if len(t.items) > 1 else "")
    inner = getattr(t, "inner", None)
    return _source_names(inner) if inner is not None else getattr(t, "name", "?")


def _experts_to_native(arch: str, i: int, cfg: Config, take) -> dict[str, LazyTensor]:
    prefix, (w_gate, w_up, w_down) = _moe_prefix(arch, i), _expert_names(arch)
    E, nat = cfg.moe.num_experts, f"{native_block(cfg.model, i)}.ffn"
    state = {ours: take(theirs) for ours, theirs in _router_pairs(arch, i, cfg)}
    if arch == "GptOssForCausalLM":  # fused [E, D, 2F] with gate and up interleaved; down [E, F, D] as ours
        state[f"{nat}.experts.w_gate_up"] = Deinterleaved(take(f"{prefix}.experts.gate_up_proj"))
        state[f"{nat}.experts.b_gate_up"] = Deinterleaved(take(f"{prefix}.experts.gate_up_proj_bias"))
        state[f"{nat}.experts.w_down"] = take(f"{prefix}.experts.down_proj")
        state[f"{nat}.experts.b_down"] = take(f"{prefix}.experts.down_proj_bias")
        return state

    def expert(e: int, name: str) -> LazyTensor:  # [F, D] or [D, F], transposed to ours
        return Transposed(take(f"{prefix}.experts.{e}.{name}.weight"))

    # ours: w_gate_up[e, :, 0] = gate_e.T, w_gate_up[e, :, 1] = up_e.T, w_down[e] = down_e.T
    state[f"{nat}.experts.w_gate_up"] = Stacked(
        [Stacked([expert(e, w_gate), expert(e, w_up)], dim=1) for e in range(E)], dim=0
    )
    state[f"{nat}.experts.w_down"] = Stacked([expert(e, w_down) for e in range(E)], dim=0)
    if cfg.moe.num_shared_experts:
        state.update({ours: take(theirs) for ours, theirs in _shared_pairs(arch, i, cfg.model)})
        if cfg.moe.shared_expert_gate:
            state[f"{nat}.shared_gate.weight"] = take(f"{prefix}.shared_expert_gate.weight")
    elif arch == "Qwen2MoeForCausalLM":  # a zero-width shared expert (our own exports write one)
        for name in _empty_shared_expert(prefix, 0, torch.float32):
            if take(name).numel() and not name.endswith("shared_expert_gate.weight"):
                raise HFFormatError(f"{name} is not empty but shared_expert_intermediate_size is 0")
    return state


# ---- writing ----------------------------------------------------------------------------------
def _hf_outer(state: Mapping[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
    """The HF tensors outside the blocks: embeddings, final norm, output projection."""
    out = {"model.embed_tokens.weight": state["embed.weight"], "model.norm.weight": state["norm.weight"]}
    if not cfg.model.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    return _on_cpu(out)


def _hf_block(state: Mapping[str, torch.Tensor], cfg: Config, arch: str, i: int) -> dict[str, torch.Tensor]:
    """The HF tensors of block i (reads only block i's entries of `state`)."""
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in _attn_pairs(i, cfg.model, *attention_bias(cfg, arch)):
        # a bias the format always has and the model lacks is written as zeros (the same function)
        out[theirs] = state[ours] if ours in state else torch.zeros(state[ours.replace(".bias", ".weight")].shape[0])
    m = cfg.model
    if block_is_moe(m, i):
        out.update(_experts_from_native(arch, i, cfg, state))
    else:
        for ours, theirs in _swiglu_pairs(f"{native_block(m, i)}.ffn", f"model.layers.{i}.mlp", PROJ_NAMES):
            out[theirs] = state[ours]
    if i >= m.n_layers:  # an MTP module, with the copies of the embedding and head DeepSeek-V3 stores
        out.update({theirs: state[ours] for ours, theirs in _mtp_pairs(m, i)})
        out[f"model.layers.{i}.embed_tokens.weight"] = state["embed.weight"]
        out[f"model.layers.{i}.shared_head.head.weight"] = state["lm_head.weight"]
    return _on_cpu(out)


def _on_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def _experts_from_native(arch: str, i: int, cfg: Config, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix, (w_gate, w_up, w_down) = _moe_prefix(arch, i), _expert_names(arch)
    nat = f"{native_block(cfg.model, i)}.ffn"
    w_ED2F, down_EFD = state[f"{nat}.experts.w_gate_up"], state[f"{nat}.experts.w_down"]
    E, D, _, F = w_ED2F.shape
    # DeepSeek-V3 always has a selection bias: a router without one (no aux-free balancing) has zeros
    out = {theirs: state[ours] if ours in state else torch.zeros(E) for ours, theirs in _router_pairs(arch, i, cfg)}
    if arch == "GptOssForCausalLM":  # interleave gate and up; biases the model lacks are zeros
        b_gate_up = state.get(f"{nat}.experts.b_gate_up", torch.zeros(E, 2, F, dtype=w_ED2F.dtype))
        out[f"{prefix}.experts.gate_up_proj"] = w_ED2F.transpose(-1, -2).reshape(E, D, 2 * F)
        out[f"{prefix}.experts.gate_up_proj_bias"] = b_gate_up.transpose(-1, -2).reshape(E, 2 * F)
        out[f"{prefix}.experts.down_proj"] = down_EFD
        out[f"{prefix}.experts.down_proj_bias"] = state.get(f"{nat}.experts.b_down", torch.zeros(E, D))
        out.setdefault(f"{prefix}.router.bias", torch.zeros(E, dtype=w_ED2F.dtype))
        return out
    for e in range(cfg.moe.num_experts):
        out[f"{prefix}.experts.{e}.{w_gate}.weight"] = w_ED2F[e, :, 0].t()
        out[f"{prefix}.experts.{e}.{w_up}.weight"] = w_ED2F[e, :, 1].t()
        out[f"{prefix}.experts.{e}.{w_down}.weight"] = down_EFD[e].t()
    if cfg.moe.num_shared_experts:
        out.update({theirs: state[ours] for ours, theirs in _shared_pairs(arch, i, cfg.model)})
        if cfg.moe.shared_expert_gate:
            out[f"{prefix}.shared_expert_gate.weight"] = state[f"{nat}.shared_gate.weight"]
        elif arch == "Qwen2MoeForCausalLM":  # it always gates: sigmoid(0) = 1/2 times a doubled down projection
            down = f"{prefix}.shared_expert.down_proj.weight"
            out[down] = out[down] * 2
            out[f"{prefix}.shared_expert_gate.weight"] = torch.zeros(1, D, dtype=w_ED2F.dtype)
    elif arch == "Qwen2MoeForCausalLM":  # Qwen2-MoE always has one: a zero-width one adds nothing
        out.update(_empty_shared_expert(prefix, D, w_ED2F.dtype))
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
    hf_config = getattr(transformers, CONFIG_CLASSES[arch])(**hf_config_dict(cfg, arch))
    hf_config.architectures = [arch]
    target.mkdir(parents=True)
    hf_config.save_pretrained(str(target))
    _write_shards(target, state, cfg, arch)
    if tokenizer_from is not None:
        copy_tokenizer(tokenizer_from, target)
    return arch


def _write_shards(target: Path, state: Mapping[str, torch.Tensor], cfg: Config, arch: str) -> None:
    # the blocks in order, the MTP modules, then the rest
    parts: list[int | None] = [*range(cfg.model.n_layers + cfg.model.mtp_depth), None]
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
