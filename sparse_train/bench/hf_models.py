"""Tiny random Hugging Face models of every architecture the HF importer reads, built locally with
transformers (nothing is downloaded): the inputs of `sparse-train bench convert`.

Each kind exercises its architecture's features: grouped key/value heads, Qwen2's biases and
tied embeddings, Qwen2-MoE's gated shared expert and a dense first block, Qwen3's explicit
head_dim and q/k norms, DeepSeek-V3's MLA with both latents, group-limited routing, a shared
expert, a dense first block and YaRN, gpt-oss's sinks, alternating sliding windows and YaRN.
Weights are drawn N(0, 0.2) (wider than the default 0.02) so that every part moves the logits.

Importing this module imports neither torch nor transformers: the CLI reads KINDS for --help.
"""

from __future__ import annotations

import os
from typing import Any

KINDS = ("llama", "mistral", "qwen2", "mixtral", "qwen2moe", "qwen3", "qwen3moe", "olmoe", "deepseek_v3", "gpt_oss")

COMMON: dict[str, Any] = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
# YaRN over a 16-token pre-training context, so positions 0..15 of a 16-token input already
# cross into the interpolated frequencies' range of the tables
DEEPSEEK_ROPE = {
    "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
    "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
}  # fmt: skip
GPT_OSS_ROPE = {
    "rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "original_max_position_embeddings": 16,
    "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
}  # fmt: skip
MOE = {"num_experts": 4, "num_experts_per_tok": 2}
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("Llama", COMMON),
    "mistral": ("Mistral", {**COMMON, "sliding_window": None}),
    "qwen2": ("Qwen2", {**COMMON, "tie_word_embeddings": True}),
    "mixtral": ("Mixtral", {**COMMON, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2moe": (
        "Qwen2Moe",
        {**COMMON, **MOE, "moe_intermediate_size": 12, "shared_expert_intermediate_size": 16, "mlp_only_layers": [0]},
    ),
    "qwen3": ("Qwen3", {**COMMON, "head_dim": 16}),
    "qwen3moe": (
        "Qwen3Moe",
        {**COMMON, **MOE, "head_dim": 16, "moe_intermediate_size": 12, "norm_topk_prob": True, "mlp_only_layers": [0]},
    ),
    "olmoe": ("Olmoe", {**COMMON, **MOE}),
    "deepseek_v3": (
        "DeepseekV3",
        {
            **COMMON,
            "num_hidden_layers": 3,
            "num_key_value_heads": 4,
            "moe_intermediate_size": 12,
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "n_group": 2,
            "topk_group": 1,
            "n_shared_experts": 1,
            "first_k_dense_replace": 1,
            "q_lora_rank": 16,
            "kv_lora_rank": 8,
            "qk_nope_head_dim": 8,
            "qk_rope_head_dim": 4,
            "v_head_dim": 8,
            "routed_scaling_factor": 2.5,
            "rope_parameters": DEEPSEEK_ROPE,
        },
    ),
    "gpt_oss": (
        "GptOss",
        {
            **COMMON,
            "num_hidden_layers": 3,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "head_dim": 8,
            "sliding_window": 4,
            "rope_parameters": GPT_OSS_ROPE,
        },
    ),
}


def import_transformers() -> Any:
    """transformers, offline; a one-line error when it is not installed."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model here is local: never reach the Hub
    try:
        import transformers
    except ImportError:
        raise RuntimeError("needs transformers: pip install 'sparse_train[hf]'") from None
    return transformers


def build_hf(kind: str, seed: int = 0, vocab_size: int = 64) -> Any:
    """A random tiny transformers model of `kind` (KINDS), in evaluation mode."""
    import torch

    t = import_transformers()
    prefix, fields = CONFIGS[kind]
    fields = {**fields, "vocab_size": vocab_size}
    torch.manual_seed(seed)
    model = getattr(t, f"{prefix}ForCausalLM")(getattr(t, f"{prefix}Config")(**fields))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3's selection bias: a trained buffer
                b.normal_(0, 0.2)
    return model.eval()
