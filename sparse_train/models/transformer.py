"""Decoder-only language model: RMSNorm, rotary attention (sparse_train.models.attention: GQA
or MLA), SwiGLU, MoE or FFF FFNs.

Single-device code only: no process groups here. Parameter names and the rotary convention
are chosen so that weights map 1:1 onto the Hugging Face layouts (sparse_train.upcycle.hf).

Shape legend: B batch, S sequence, D model width, H heads, Hkv key/value heads, Dh head width, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from sparse_train.config import FFFConfig, ModelConfig, MoEConfig, RouterConfig
from sparse_train.models.attention import build_attention
from sparse_train.models.experts import SwiGLU
from sparse_train.models.fff import FFFLayer
from sparse_train.models.init import init_parameters
from sparse_train.models.moe import MoELayer
from sparse_train.models.mtp import MTPModule
from sparse_train.models.rope import rotary_tables
from sparse_train.models.sparse import SparseAux, SparseFFN


class Block(nn.Module):
    """Pre-norm attention, then the FFN it is given (a dense SwiGLU, an MoE layer or an FFF tree)."""

    def __init__(self, m: ModelConfig, ffn: nn.Module, index: int = 0) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(m.d_model, eps=m.norm_eps)
        self.attn = build_attention(m, index)
        self.ffn_norm = nn.RMSNorm(m.d_model, eps=m.norm_eps)
        self.ffn = ffn

    def forward(
        self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, carry: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, SparseAux | None]:
        """`carry`: what the previous sparse layer passes on (SparseAux.carry), if anything."""
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), cos, sin)
        h_BSD = self.ffn_norm(x_BSD)
        if isinstance(self.ffn, SparseFFN):
            y_BSD, aux = self.ffn(h_BSD) if carry is None else self.ffn(h_BSD, carry)
            return x_BSD + y_BSD, aux
        return x_BSD + self.ffn(h_BSD), None


@dataclass
class ModelOutput:
    logits_BSV: torch.Tensor
    sparse_aux: list[SparseAux] = field(default_factory=list)  # one entry per sparse (MoE/FFF) block, in order
    # multi-token prediction: module k's logits [B, S - k, V] for the tokens k + 1 places on (sparse_train.models.mtp)
    mtp_logits: list[torch.Tensor] = field(default_factory=list)


class Transformer(nn.Module):
    """The decoder LM of a model section; the sparse sections shape its sparse blocks (model.ffn,
    placed by model.sparse_every_n / sparse_layers): moe + router for MoE, fff for FFF trees."""

    def __init__(
        self,
        model: ModelConfig,
        moe: MoEConfig | None = None,
        router: RouterConfig | None = None,
        fff: FFFConfig | None = None,
    ) -> None:
        super().__init__()
        m = model
        if m.vocab_size is None:
            raise ValueError("model.vocab_size must be resolved (from the tokenizer) before building the model")
        moe, router, fff = moe or MoEConfig(), router or RouterConfig(), fff or FFFConfig()
        self.config = m
        # routed experts (MoE: top_k) or leaves (FFF: the one the hard descent picks at inference) per token
        self.active_experts = 1 if m.ffn == "fff" else router.top_k
        self.embed = nn.Embedding(m.vocab_size, m.d_model)
        sparse = [i for i in range(m.n_layers) if m.ffn != "dense" and m.is_sparse_layer(i)]
        self.blocks = nn.ModuleList(
            Block(m, sparse_ffn(m, moe, router, fff, follows_sparse=i > sparse[0]) if i in sparse else dense_ffn(m), i)
            for i in range(m.n_layers)
        )

        # multi-token prediction modules, each with a block like the last one (DeepSeek-V3: MoE)
        def mtp_ffn() -> nn.Module:
            return sparse_ffn(m, moe, router, fff) if m.n_layers - 1 in sparse else dense_ffn(m)

        self.mtp = nn.ModuleList(MTPModule(m, Block(m, mtp_ffn(), m.n_layers + k)) for k in range(m.mtp_depth))
        # MoE++ gating residuals pass router logits between MoE layers (and across pipeline stages)
        self.carry_width = moe.num_experts + moe.zero_experts + moe.copy_experts + moe.constant_experts
        self.carry_width = self.carry_width if m.ffn == "moe" and moe.gating_residual else 0
        self.norm = nn.RMSNorm(m.d_model, eps=m.norm_eps)
        self.lm_head = nn.Linear(m.d_model, m.vocab_size, bias=False)
        if m.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rotary_tables(m)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if not self.embed.weight.is_meta:  # built on the meta device: `materialize` initialises
            self.reset_parameters()

    @property
    def sparse_layers(self) -> list[SparseFFN]:
        """The sparse FFNs in the order of ModelOutput.sparse_aux: the blocks', then the MTP modules'."""
        blocks = [*self.blocks, *(module.block for module in self.mtp)]
        return [b.ffn for b in blocks if isinstance(b.ffn, SparseFFN)]

    def reset_parameters(self, seed: int | None = None) -> None:
        """Seeded, layout-independent initialisation (sparse_train.models.init); without a seed,
        one drawn from torch's global generator (so `torch.manual_seed` fixes the weights)."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        init_parameters(self, self.config, seed)

    def forward(self, tokens_BS: torch.Tensor) -> ModelOutput:
        S = tokens_BS.shape[1]
        if S > self.rope_cos.shape[0]:
            raise ValueError(f"sequence length {S} exceeds model.max_seq_len {self.rope_cos.shape[0]}")
        cos, sin = self.rope_cos[:S], self.rope_sin[:S]
        x_BSD = self.embed(tokens_BS)
        aux: list[SparseAux] = []
        carry = None
        for block in self.blocks:
            x_BSD, layer_aux = block(x_BSD, cos, sin, carry)
            if layer_aux is not None:
                aux.append(layer_aux)
                carry = layer_aux.carry
        main_BSD, mtp_logits = x_BSD, []
        for k, module in enumerate(self.mtp, start=1):  # module k sees S - k positions
            if S <= k:
                raise ValueError(f"multi-token prediction module {k} needs sequences longer than {k} tokens")
            x_BSD, normed_BSD, layer_aux = module(
                x_BSD[:, : S - k], self.embed(tokens_BS[:, k:]), cos[: S - k], sin[: S - k]
            )
            aux += [layer_aux] if layer_aux is not None else []
            mtp_logits.append(self.lm_head(normed_BSD))
        return ModelOutput(self.lm_head(self.norm(main_BSD)), aux, mtp_logits)


def materialize(module: nn.Module, m: ModelConfig, device: torch.device, seed: int | None) -> None:
    """Give a model built on the meta device (whole, a pipeline stage, or sharded by the layout)
    storage on `device`: only this rank's parts are allocated, and drawn from `seed`
    (sparse_train.models.init) unless it is None, when the caller loads every parameter. The
    rotary tables are recomputed and the routers' expert biases start at zero."""
    module.to_empty(device=device)
    cos, sin = rotary_tables(m)
    for sub in module.modules():
        if "rope_cos" in sub._buffers:
            sub.rope_cos, sub.rope_sin = cos.to(device), sin.to(device)
        elif getattr(sub, "expert_bias_E", None) is not None:
            sub.expert_bias_E.zero_()  # aux-loss-free balancing starts unbiased (a checkpoint loads its own)
    if seed is not None:
        init_parameters(module, m, seed)


def dense_ffn(m: ModelConfig) -> SwiGLU:
    return SwiGLU(m.d_model, m.ffn_hidden)


def sparse_ffn(
    m: ModelConfig, moe: MoEConfig, router: RouterConfig, fff: FFFConfig, *, follows_sparse: bool = False
) -> SparseFFN:
    """The FFN of a sparse block: an MoE layer or an FFF tree (model.ffn); `follows_sparse`: a
    sparse block comes before it."""
    if m.ffn == "fff":
        return FFFLayer(m.d_model, fff)
    return MoELayer(m.d_model, moe, router, follows_moe=follows_sparse)


def count_parameters(model: Transformer) -> dict[str, int]:
    """Total parameters and those active per token (routed experts count top_k of E; an FFF
    counts its nodes and the one leaf inference runs)."""
    total = sum(p.numel() for p in model.parameters())
    active = total
    k = model.active_experts
    for layer in model.sparse_layers:
        per_expert = sum(p[0].numel() for p in layer.experts.parameters())
        active -= per_expert * (layer.num_experts - k)
    return {"total": total, "active": active}
