"""Hugging Face config.json <-> sparse_train config, for each supported architecture.

Reading is strict: every key of an HF config is either understood (mapped, or checked to hold
the one value the model supports) or on a short list of keys that do not change the function
(token ids, cache and initialisation settings, training-loss coefficients). Anything else is
refused with its name, so a model whose config holds a feature the importer does not know
is never converted into a different function silently.

Writing picks the architecture from the model's features (`export_arch`) and fills the
config class's fields; `transformers` then builds and saves the config (sparse_train.upcycle.hf).
"""

from __future__ import annotations

from typing import Any

from sparse_train.config import Config, ConfigError, compose_config
from sparse_train.models.rope import rope_fields_from_hf, rope_parameters_to_hf

DENSE_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
MOE_ARCHS = (
    "MixtralForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM",
    "OlmoeForCausalLM",
    "DeepseekV3ForCausalLM",
    "GptOssForCausalLM",
)
SUPPORTED = DENSE_ARCHS + MOE_ARCHS
CONFIG_CLASSES = {arch: arch.replace("ForCausalLM", "Config") for arch in SUPPORTED}
MAX_ROPE_TABLE = 8192  # rotary table rows we build; positions beyond it are refused at run time

# Keys that never change the function the weights compute.
IGNORED = frozenset(
    "_name_or_path architectures model_type transformers_version dtype torch_dtype id2label label2id "
    "return_dict output_attentions output_hidden_states chunk_size_feed_forward is_encoder_decoder "
    "problem_type bos_token_id eos_token_id pad_token_id use_cache initializer_range tokenizer_class "
    "output_router_logits router_aux_loss_coef router_z_loss_coef router_jitter_noise aux_loss_alpha "
    "seq_aux ep_size max_window_layers _attn_implementation auto_map".split()
)
COMMON = frozenset(
    "vocab_size hidden_size num_hidden_layers num_attention_heads num_key_value_heads intermediate_size "
    "max_position_embeddings rms_norm_eps hidden_act tie_word_embeddings rope_parameters rope_theta "
    "rope_scaling attention_dropout head_dim".split()
)
_QWEN_WINDOW = {"sliding_window", "use_sliding_window", "layer_types"}
_QWEN_MOE = {"decoder_sparse_step", "mlp_only_layers", "moe_intermediate_size", "num_experts", "num_experts_per_tok"}
UNDERSTOOD = {
    "LlamaForCausalLM": COMMON | {"attention_bias", "mlp_bias", "pretraining_tp"},
    "MistralForCausalLM": COMMON | {"sliding_window"},
    "Qwen2ForCausalLM": COMMON | _QWEN_WINDOW,
    "Qwen3ForCausalLM": COMMON | _QWEN_WINDOW | {"attention_bias"},
    "MixtralForCausalLM": COMMON | {"sliding_window", "num_local_experts", "num_experts_per_tok"},
    "Qwen2MoeForCausalLM": COMMON
    | _QWEN_WINDOW
    | _QWEN_MOE
    | {"qkv_bias", "norm_topk_prob", "shared_expert_intermediate_size"},
    "Qwen3MoeForCausalLM": COMMON
    | _QWEN_WINDOW
    | _QWEN_MOE
    | {"attention_bias", "norm_topk_prob", "num_local_experts"},
    "OlmoeForCausalLM": COMMON | {"attention_bias", "clip_qkv", "num_experts", "num_experts_per_tok", "norm_topk_prob"},
    "DeepseekV3ForCausalLM": COMMON
    | set(
        "attention_bias first_k_dense_replace kv_lora_rank q_lora_rank qk_nope_head_dim qk_rope_head_dim qk_head_dim "
        "v_head_dim moe_intermediate_size n_routed_experts n_shared_experts n_group topk_group num_experts_per_tok "
        "norm_topk_prob routed_scaling_factor rope_interleave num_nextn_predict_layers pretraining_tp "
        "moe_layer_freq scoring_func topk_method".split()
    ),
    "GptOssForCausalLM": COMMON
    | set(
        "attention_bias layer_types sliding_window swiglu_alpha swiglu_limit num_local_experts "
        "num_experts_per_tok experts_per_token".split()
    ),
}


class HFFormatError(ConfigError):
    """A local HF directory that cannot be converted: the message says which file and why."""

    def __init__(self, message: str) -> None:
        super().__init__("--from", message)


def _require(c: dict[str, Any], arch: str, key: str, allowed: tuple, why: str) -> None:
    """Refuse a config value the model cannot reproduce, naming the key and the architecture."""
    if c.get(key, allowed[0]) not in allowed:
        raise HFFormatError(f"{arch}: {key}={c[key]!r} is not supported ({why})")


def native_config(ckpt: Any, base: Config | None = None) -> Config:
    """The sparse_train config of an HF checkpoint's model (other sections from `base`)."""
    c, arch = ckpt.hf_config, ckpt.arch
    unknown = sorted(set(c) - UNDERSTOOD[arch] - IGNORED)
    if unknown:
        raise HFFormatError(f"{arch}: config field {unknown[0]!r} is not understood by the importer")
    _require(c, arch, "hidden_act", ("silu",), "SwiGLU with silu only")
    _require(c, arch, "attention_dropout", (0, 0.0), "no attention dropout")
    _require(c, arch, "mlp_bias", (False,), "no biases in the dense FFN")
    _require(c, arch, "pretraining_tp", (1,), "the tensor-parallel emulation of Llama 2 is not reproduced")
    heads = int(c["num_attention_heads"])
    max_seq = min(int(c.get("max_position_embeddings", 4096)), MAX_ROPE_TABLE)
    data = base.to_dict() if base is not None else {}
    try:
        rope = rope_fields_from_hf(c)
    except ValueError as err:
        raise HFFormatError(f"{arch}: {err}") from None
    model = {
        "vocab_size": int(c["vocab_size"]),
        "d_model": int(c["hidden_size"]),
        "n_layers": int(c["num_hidden_layers"]),
        "n_heads": heads,
        "n_kv_heads": int(c.get("num_key_value_heads") or heads),
        "ffn_hidden": int(c.get("intermediate_size", 4 * c["hidden_size"])),
        "max_seq_len": max_seq,
        "norm_eps": float(c.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(c.get("tie_word_embeddings", False)),
        "qkv_bias": _qkv_bias(c, arch),
        "ffn": "dense",
        "first_k_dense": 0,
        "mtp_depth": 0,
        **rope,
        "attention": _attention_section(c, arch),
    }
    if arch == "MistralForCausalLM" and c.get("sliding_window"):  # full attention within the window
        model["max_seq_len"] = min(max_seq, int(c["sliding_window"]))
    data["model"] = {**data.get("model", {}), **model}
    if arch in MOE_ARCHS:
        data["model"]["ffn"] = "moe"
        data["moe"], data["router"], model_fields = _moe_sections(c, arch, data)
        data["model"].update(model_fields)
    if arch == "DeepseekV3ForCausalLM":
        # MTP modules are layers n_layers, n_layers + 1, ... when the file has them (transformers
        # saves none and ignores them: a model without them computes the same logits)
        n = int(c["num_hidden_layers"])
        depth = int(c.get("num_nextn_predict_layers") or 0)
        data["model"]["mtp_depth"] = sum(f"model.layers.{n + k}.eh_proj.weight" in ckpt.tensors for k in range(depth))
    data.setdefault("data", {})["seq_len"] = min(data.get("data", {}).get("seq_len", 128), data["model"]["max_seq_len"])
    return compose_config(data)


def _qkv_bias(c: dict[str, Any], arch: str) -> bool:
    if arch == "Qwen2ForCausalLM":
        return True
    if arch == "Qwen2MoeForCausalLM":
        return bool(c.get("qkv_bias", True))
    return arch != "DeepseekV3ForCausalLM" and bool(c.get("attention_bias"))


def _attention_section(c: dict[str, Any], arch: str) -> dict[str, Any]:
    heads, hidden = int(c["num_attention_heads"]), int(c["hidden_size"])
    attention: dict[str, Any] = {"kind": "gqa", "qk_norm": "none", "sinks": False, "sliding_window": None}
    attention["out_bias"] = arch not in ("Qwen2ForCausalLM", "DeepseekV3ForCausalLM") and bool(c.get("attention_bias"))
    if arch != "DeepseekV3ForCausalLM" and c.get("head_dim") not in (None, hidden // heads):
        attention["head_dim"] = int(c["head_dim"])
    if arch.startswith("Qwen"):
        _require(c, arch, "use_sliding_window", (False,), "sliding-window attention is gpt-oss's only")
    if arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"):
        attention["qk_norm"] = "head"
    elif arch == "OlmoeForCausalLM":
        _require(c, arch, "clip_qkv", (None,), "q/k/v clipping is not reproduced")
        attention["qk_norm"] = "full"
    elif arch == "DeepseekV3ForCausalLM":
        _require(c, arch, "attention_bias", (False,), "no biases on the latent projections")
        attention.update(
            kind="mla",
            q_lora_rank=c.get("q_lora_rank"),
            kv_lora_rank=int(c["kv_lora_rank"]),
            qk_nope_head_dim=int(c["qk_nope_head_dim"]),
            qk_rope_head_dim=int(c["qk_rope_head_dim"]),
            v_head_dim=int(c["v_head_dim"]),
            rope_interleave=bool(c.get("rope_interleave", True)),
        )
    elif arch == "GptOssForCausalLM":
        types = c.get("layer_types") or ["full_attention"] * int(c["num_hidden_layers"])
        odd = sorted(set(types) - {"full_attention", "sliding_attention"})
        if odd:
            raise HFFormatError(f"{arch}: layer type {odd[0]!r} is not supported")
        sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
        if sliding:
            attention.update(sliding_window=int(c["sliding_window"]), sliding_layers=sliding)
        attention["sinks"] = True
    return attention


def _moe_sections(c: dict[str, Any], arch: str, data: dict[str, Any]) -> tuple[dict, dict, dict]:
    """The moe and router sections of an HF MoE config, and the model fields placing its MoE blocks."""
    moe, router = dict(data.get("moe", {})), dict(data.get("router", {}))
    bias_rate = float(router.get("bias_update_rate") or 0.001)  # DeepSeek-V3's gamma, unless the base sets one
    moe.update(num_shared_experts=0, shared_expert_hidden=None, shared_expert_gate=False, expert_bias=False)
    moe.update(expert_activation="swiglu")
    router.update(
        top_k=int(c["num_experts_per_tok"]),
        score="softmax",
        scaling_factor=1.0,
        num_groups=None,
        group_top_k=None,
        bias=False,
        bias_update_rate=0.0,
    )
    every_block = {"sparse_layers": None, "sparse_every_n": 1, "first_k_dense": 0}
    if arch in ("MixtralForCausalLM", "GptOssForCausalLM"):
        # gpt-oss: softmax over the top-k logits, which is the renormalised top-k of the softmax
        moe.update(num_experts=int(c["num_local_experts"]), expert_hidden=int(c["intermediate_size"]))
        router.update(renormalize=True)
        if arch == "GptOssForCausalLM":
            moe.update(expert_activation="gpt_oss", expert_bias=True, expert_limit=float(c.get("swiglu_limit", 7.0)))
            moe["expert_alpha"] = float(c.get("swiglu_alpha", 1.702))
            router["bias"] = True
        return moe, router, every_block
    router["renormalize"] = bool(c.get("norm_topk_prob", False))
    if arch == "OlmoeForCausalLM":
        moe.update(num_experts=int(c["num_experts"]), expert_hidden=int(c["intermediate_size"]))
        return moe, router, every_block
    if arch == "DeepseekV3ForCausalLM":
        return _deepseek_sections(c, arch, moe, {**router, "bias_update_rate": bias_rate})
    n_layers = int(c["num_hidden_layers"])
    dense = set(c.get("mlp_only_layers") or [])
    step = int(c.get("decoder_sparse_step", 1))
    sparse = [i for i in range(n_layers) if i not in dense and (i + 1) % step == 0]
    shared = int(c.get("shared_expert_intermediate_size") or 0)
    moe.update(
        num_experts=int(c.get("num_experts") or c["num_local_experts"]),  # transformers 5 writes the latter for Qwen3
        expert_hidden=int(c["moe_intermediate_size"]),
        num_shared_experts=1 if shared else 0,
        shared_expert_hidden=shared or None,
        shared_expert_gate=bool(shared),
    )
    return moe, router, {**every_block, "sparse_layers": sparse}


def _deepseek_sections(c: dict[str, Any], arch: str, moe: dict, router: dict) -> tuple[dict, dict, dict]:
    _require(c, arch, "moe_layer_freq", (1,), "every block after first_k_dense_replace is MoE")
    _require(c, arch, "scoring_func", ("sigmoid",), "DeepSeek-V3 scores experts by a sigmoid")
    _require(c, arch, "topk_method", ("noaux_tc",), "group-limited routing with the correction bias")
    top_k, groups, group_top_k = int(c["num_experts_per_tok"]), c.get("n_group"), c.get("topk_group")
    if groups and group_top_k and top_k != 2 * int(group_top_k):
        # HF scores a group by its best two experts; our router by its best top_k / group_top_k
        raise HFFormatError(f"{arch}: num_experts_per_tok={top_k} with topk_group={group_top_k} is not supported")
    shared = int(c.get("n_shared_experts") or 0)
    moe.update(
        num_experts=int(c["n_routed_experts"]),
        expert_hidden=int(c["moe_intermediate_size"]),
        num_shared_experts=1 if shared else 0,
        shared_expert_hidden=shared * int(c["moe_intermediate_size"]) or None,
    )
    router.update(
        score="sigmoid",
        scaling_factor=float(c.get("routed_scaling_factor", 1.0)),
        num_groups=int(groups) if groups and group_top_k else None,
        group_top_k=int(group_top_k) if groups and group_top_k else None,
    )
    fields = {"sparse_layers": None, "sparse_every_n": 1, "first_k_dense": int(c.get("first_k_dense_replace", 0))}
    return moe, router, fields


# ---- writing ----------------------------------------------------------------------------------
def _refuse(field: str, arch: str | None = None, why: str = "") -> ConfigError:
    where = f"the {arch} format cannot hold it" if arch else "no Hugging Face format holds it"
    return ConfigError(field, f"{where}{'; ' + why if why else ''}; keep --format native")


def export_arch(cfg: Config) -> str:
    """The HF architecture a native model is written as, from its features:

        multi-head latent attention              DeepseekV3 (MoE after the first dense blocks)
        sinks / sliding window / gpt-oss experts GptOss
        q/k norm over the whole projection       Olmoe
        q/k norm per head                        Qwen3 (dense) or Qwen3Moe
        otherwise                                Llama or Qwen2 (dense; Qwen2 for q/k/v biases
                                                 without an output bias), Mixtral when it maps
                                                 exactly, else Qwen2Moe
    A feature the chosen format cannot hold raises a ConfigError naming the field."""
    m, moe, r, a = cfg.model, cfg.moe, cfg.router, cfg.model.attention
    if m.ffn == "fff":
        raise ConfigError("--format", "FFF models have no Hugging Face architecture; keep --format native")
    if m.ffn == "moe":
        _check_moe_exportable(cfg)
    sparse = [m.ffn == "moe" and m.is_sparse_layer(i) for i in range(m.n_layers)]
    gpt_oss = a.sinks or a.sliding_window is not None or moe.expert_activation == "gpt_oss" or moe.expert_bias or r.bias
    if a.kind == "mla":
        arch = "DeepseekV3ForCausalLM"
    elif gpt_oss and m.ffn == "moe":
        arch = "GptOssForCausalLM"
    elif gpt_oss:
        raise _refuse("model.attention.sinks", why="sinks and sliding windows are exported as gpt-oss, an MoE model")
    elif a.qk_norm == "full":
        arch = "OlmoeForCausalLM" if m.ffn == "moe" else None
    elif a.qk_norm == "head":
        arch = "Qwen3MoeForCausalLM" if m.ffn == "moe" else "Qwen3ForCausalLM"
    elif m.ffn == "dense":
        arch = "Qwen2ForCausalLM" if m.qkv_bias and not a.out_bias else "LlamaForCausalLM"
    elif all(sparse) and not moe.num_shared_experts and r.renormalize and not m.qkv_bias and not a.out_bias:
        arch = "MixtralForCausalLM"
    else:
        arch = "Qwen2MoeForCausalLM"
    if arch is None:
        raise _refuse("model.attention.qk_norm", why="whole-projection q/k norms are OLMoE's, an MoE model")
    _check_fits(cfg, arch, sparse)
    return arch


def _check_moe_exportable(cfg: Config) -> None:
    moe, r = cfg.moe, cfg.router
    if moe.capacity_factor is not None:
        raise ConfigError("moe.capacity_factor", "HF MoE blocks are dropless: export a model with capacity_factor null")
    for key in ("zero_experts", "copy_experts", "constant_experts", "gating_residual"):
        if getattr(moe, key):
            raise ConfigError(f"moe.{key}", "HF MoE formats cannot hold MoE++'s parts; keep --format native")
    if r.combine != "weights":
        raise ConfigError("router.combine", "HF MoE blocks weight experts by the router: export needs combine: weights")
    if r.type not in ("topk", "topk_softmax", "sinkhorn", "selective_sinkhorn"):  # both Sinkhorns: top-k at inference
        raise ConfigError("router.type", f"{r.type} routing has no Hugging Face MoE format; keep --format native")


def _check_fits(cfg: Config, arch: str, sparse: list[bool]) -> None:
    """Refuse, by field, what `arch`'s format cannot hold (biases a format always has are written
    as zeros instead: the same function)."""
    m, moe, r, a = cfg.model, cfg.moe, cfg.router, cfg.model.attention
    deepseek, gpt_oss = arch == "DeepseekV3ForCausalLM", arch == "GptOssForCausalLM"
    if m.mtp_depth and not deepseek:
        raise _refuse("model.mtp_depth", arch)
    if a.rope_interleave and not deepseek:
        raise _refuse("model.attention.rope_interleave", arch)
    if m.rope_scaling.kind != "none" and arch in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM", "MixtralForCausalLM"):
        raise _refuse("model.rope_scaling.kind", arch)
    if a.head_dim not in (None, m.d_model // m.n_heads) and arch in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM"):
        raise _refuse("model.attention.head_dim", arch)
    if m.ffn == "moe":
        if moe.expert_activation == "gpt_oss" and not gpt_oss:
            raise _refuse("moe.expert_activation", arch)
        if gpt_oss and moe.expert_activation != "gpt_oss":
            raise _refuse("moe.expert_activation", arch, "gpt-oss experts use its clamped activation")
        plain_softmax = arch != "DeepseekV3ForCausalLM"
        for key, value, plain in (
            ("score", r.score, "softmax"),
            ("scaling_factor", r.scaling_factor, 1.0),
            ("num_groups", r.num_groups, None),
            ("bias_update_rate", r.bias_update_rate, 0.0),  # a selection bias: DeepSeek-V3's alone
        ):
            if plain_softmax and value != plain:
                raise _refuse(f"router.{key}", arch, "it routes by a plain softmax top-k")
        if deepseek and r.score != "sigmoid":
            raise _refuse("router.score", arch, "DeepSeek-V3 scores experts by a sigmoid")
        if deepseek and r.num_groups is not None and r.top_k != 2 * r.group_top_k:
            raise _refuse("router.group_top_k", arch, "it scores a group by its best two experts")
        if not all(sparse) and arch in ("MixtralForCausalLM", "OlmoeForCausalLM", "GptOssForCausalLM"):
            raise _refuse("model.sparse_layers", arch, "every block is MoE")
        if deepseek and sparse != [i >= m.first_k_dense for i in range(m.n_layers)]:
            raise _refuse("model.sparse_layers", arch, "the MoE blocks are those after model.first_k_dense")
        if moe.num_shared_experts and arch not in ("Qwen2MoeForCausalLM", "DeepseekV3ForCausalLM"):
            raise _refuse("moe.num_shared_experts", arch)
        if moe.shared_expert_gate and deepseek:
            raise _refuse("moe.shared_expert_gate", arch)
        if gpt_oss and not r.renormalize:
            raise _refuse("router.renormalize", arch, "it takes the softmax over the top-k logits")
    if a.sinks and not gpt_oss:
        raise _refuse("model.attention.sinks", arch)
    if a.qk_norm != "none" and arch not in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM"):
        raise _refuse("model.attention.qk_norm", arch)
    if (m.qkv_bias or a.out_bias) and deepseek:
        raise _refuse("model.qkv_bias", arch)
    if a.out_bias and arch in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM"):
        raise _refuse("model.attention.out_bias", arch)
    if m.qkv_bias and arch == "MixtralForCausalLM":
        raise _refuse("model.qkv_bias", arch)


def attention_bias(cfg: Config, arch: str) -> tuple[bool, bool]:
    """(q/k/v biases, output bias) the HF format of `arch` has for this model: Qwen2's q/k/v
    always; Llama, Qwen3, OLMoE all four when the model has any; gpt-oss all four always."""
    m, a = cfg.model, cfg.model.attention
    if arch in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM"):
        return True, False
    if arch == "GptOssForCausalLM":
        return True, True
    if arch in ("MixtralForCausalLM", "DeepseekV3ForCausalLM"):
        return False, False
    return (m.qkv_bias or a.out_bias,) * 2


def hf_config_dict(cfg: Config, arch: str) -> dict[str, Any]:
    """The fields of `arch`'s transformers config class for this model."""
    m, moe, r, a = cfg.model, cfg.moe, cfg.router, cfg.model.attention
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
        "rope_parameters": rope_parameters_to_hf(m),
        "intermediate_size": m.ffn_hidden,
    }
    if arch not in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM", "DeepseekV3ForCausalLM"):
        common["head_dim"] = m.head_dim
    if arch in ("LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM"):
        common["attention_bias"] = attention_bias(cfg, arch)[0]
    if arch in DENSE_ARCHS:
        return common
    experts = {"num_experts_per_tok": r.top_k, "router_aux_loss_coef": r.aux_loss_coef}
    sparse = [i for i in range(m.n_layers) if m.is_sparse_layer(i)]
    if arch == "MixtralForCausalLM":
        return {**common, **experts, "intermediate_size": moe.expert_hidden, "num_local_experts": moe.num_experts}
    if arch == "OlmoeForCausalLM":
        return {**common, **experts, "intermediate_size": moe.expert_hidden, "num_experts": moe.num_experts,
                "norm_topk_prob": r.renormalize}  # fmt: skip
    if arch == "GptOssForCausalLM":
        layer_types = ["sliding_attention" if m.sliding_window(i) else "full_attention" for i in range(m.n_layers)]
        return {
            **common,
            **experts,
            "intermediate_size": moe.expert_hidden,
            "num_local_experts": moe.num_experts,
            "layer_types": layer_types,
            "sliding_window": a.sliding_window or 128,  # unused when no layer slides
            "swiglu_limit": moe.expert_limit,
            "attention_bias": True,
        }
    if arch == "DeepseekV3ForCausalLM":
        return {
            **common,
            **experts,
            "q_lora_rank": a.q_lora_rank,
            "kv_lora_rank": a.kv_lora_rank,
            "qk_nope_head_dim": a.qk_nope_head_dim,
            "qk_rope_head_dim": a.qk_rope_head_dim,
            "v_head_dim": a.v_head_dim,
            "rope_interleave": a.rope_interleave,
            "moe_intermediate_size": moe.expert_hidden,
            "n_routed_experts": moe.num_experts,
            "n_shared_experts": _deepseek_shared(cfg),
            "n_group": r.num_groups or 1,
            "topk_group": r.group_top_k or 1,
            "routed_scaling_factor": r.scaling_factor,
            "norm_topk_prob": r.renormalize,
            "first_k_dense_replace": m.first_k_dense,
            "num_nextn_predict_layers": m.mtp_depth,
            "attention_bias": False,
        }
    qwen = {
        **common,
        **experts,
        "moe_intermediate_size": moe.expert_hidden,
        "num_experts": moe.num_experts,
        "norm_topk_prob": r.renormalize,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i in range(m.n_layers) if i not in sparse],
        "use_sliding_window": False,
    }
    if arch == "Qwen3MoeForCausalLM":
        return qwen
    return {
        **qwen,
        "shared_expert_intermediate_size": moe.num_shared_experts * (moe.shared_expert_hidden or moe.expert_hidden),
    }


def _deepseek_shared(cfg: Config) -> int:
    """DeepSeek-V3's n_shared_experts: its shared MLP is n_shared_experts x moe_intermediate_size wide."""
    moe = cfg.moe
    width = moe.num_shared_experts * (moe.shared_expert_hidden or moe.expert_hidden)
    if width % moe.expert_hidden:
        raise _refuse("moe.shared_expert_hidden", "DeepseekV3ForCausalLM", "its width is a multiple of expert_hidden")
    return width // moe.expert_hidden
