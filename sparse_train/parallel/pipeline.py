"""Pipeline parallelism: the blocks split into `pp` stages, run by torch.distributed.pipelining's 1F1B.

A stage is a view of the single-device model: it holds the same submodules under the same
names (`embed`, `blocks.<i>`, `norm`, `lm_head`), so parameter names, checkpoints and the
gathered state dict are those of the unsplit model.

The sparse (MoE/FFF) layers' auxiliary losses never leave their stage: each is attached to the stage's
hidden states by `attach_aux_loss`, an identity in the forward whose backward also feeds the
loss its gradient (coefficient x 1, Megatron's MoEAuxLossAutoScaler). Whatever the schedule,
every aux loss reaches the gradients exactly as if it were added to the last stage's loss; the
schedule's 1/n_microbatches scaling applies to both alike. A stage without sparse layers attaches
nothing. Their values (for metrics) are recorded per micro-batch on the stage.

Micro-batches: the pipeline runs the step's `train.grad_accum` micro-batches, each
`train.batch_size / dp` sequences, so a pipelined step sees exactly the micro-batches of the
unsplit run.
"""

from __future__ import annotations

import torch
from torch import nn

from sparse_train.models.sparse import SparseAux
from sparse_train.models.transformer import Transformer


class _AttachAuxLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad_hidden: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        return grad_hidden, torch.ones_like(aux_loss)


def attach_aux_loss(hidden: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
    """`hidden` unchanged; back-propagating through it also back-propagates `aux_loss` (d/d = 1)."""
    return _AttachAuxLoss.apply(hidden, aux_loss)


def stage_blocks(n_layers: int, pp: int) -> list[range]:
    """Contiguous block ranges per stage, sizes differing by at most one (earlier stages larger)."""
    base, extra = divmod(n_layers, pp)
    ranges, start = [], 0
    for s in range(pp):
        size = base + (1 if s < extra else 0)
        ranges.append(range(start, start + size))
        start += size
    return ranges


class PipelineStageModule(nn.Module):
    """Stage `stage` of `num_stages`: tokens -> hidden (first), hidden -> hidden, hidden -> logits (last)."""

    def __init__(self, model: Transformer, stage: int, num_stages: int) -> None:
        super().__init__()
        self.is_first, self.is_last = stage == 0, stage == num_stages - 1
        self.embed = model.embed if self.is_first else None
        self.blocks = nn.ModuleDict(
            {str(i): model.blocks[i] for i in stage_blocks(len(model.blocks), num_stages)[stage]}
        )
        self.norm = model.norm if self.is_last else None
        self.lm_head = model.lm_head if self.is_last else None
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)
        self.recorded_aux: list[list[SparseAux]] = []  # per micro-batch, this stage's sparse layers (detached)
        # Router logits passed between MoE layers (MoE++ gating residual) cross a stage boundary as
        # extra features of the hidden state: [B, S, D + carry_width] (zeros before the first MoE layer)
        self.carry_width = model.carry_width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h_BSD, carry = self._unpack(self.embed(x) if self.embed is not None else x)
        B, S = h_BSD.shape[:2]
        cos, sin = self.rope_cos[:S], self.rope_sin[:S]
        step_aux: list[SparseAux] = []
        for block in self.blocks.values():
            h_BSD, aux = block(h_BSD, cos, sin, carry)
            if aux is not None:
                carry = aux.carry
                if torch.is_grad_enabled():
                    h_BSD = attach_aux_loss(h_BSD, aux.objective)
                step_aux.append(aux.detached())
        self.recorded_aux.append(step_aux)
        if self.is_last:
            return self.lm_head(self.norm(h_BSD))
        if not self.carry_width:
            return h_BSD
        if carry is None:  # no MoE layer yet: the next one ignores it (it has no gating residual)
            carry = h_BSD.new_zeros(B * S, self.carry_width)
        return torch.cat([h_BSD, carry.reshape(B, S, -1).to(h_BSD.dtype)], dim=-1)

    def _unpack(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden state, carried router logits [T, E] or None) of a stage's input."""
        if not self.carry_width or self.is_first:
            return h, None
        B, S = h.shape[:2]
        return h[..., : -self.carry_width], h[..., -self.carry_width :].reshape(B * S, self.carry_width)
