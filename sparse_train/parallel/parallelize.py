"""`parallelize`: turn a built single-device model into this rank's part of the parallel layout.

Fixed order, as torchtitan's: pipeline split (keep this rank's stage), tensor parallel,
expert parallel (+ expert tensor parallel, dispatchers, global-batch count sync), data
parallel (FSDP2). Each step only rewrites parameters and installs hooks or swappable seams;
the model's code is the single-device code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B

from sparse_train.config import Config, ConfigError
from sparse_train.models.transformer import Transformer
from sparse_train.parallel.data import apply_data_parallel
from sparse_train.parallel.expert import apply_expert_parallel
from sparse_train.parallel.pipeline import PipelineStageModule
from sparse_train.parallel.runtime import DistributedRuntime
from sparse_train.parallel.tensor import apply_tensor_parallel


@dataclass
class ParallelModel:
    module: nn.Module  # the model, or this rank's pipeline stage; parameter names as the model's
    schedule: Schedule1F1B | None  # the pipeline schedule (pp > 1)
    stage: PipelineStageModule | None


# (logits of the last stage, targets) -> the micro-batch's loss; what the pipeline schedule backpropagates
PipelineLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def parallelize(model: Transformer, cfg: Config, rt: DistributedRuntime, loss_fn: PipelineLoss) -> ParallelModel:
    """This rank's part of `model` in the layout of `rt`; `loss_fn` is the pipeline's last-stage loss
    (passed in, as torchtitan's pipeline_llm does: parallel/ knows nothing of the training objective)."""
    dims, meshes = rt.dims, rt.meshes
    module: nn.Module = model
    stage: PipelineStageModule | None = None
    if dims.pp > 1:
        if cfg.model.tie_embeddings:
            raise ConfigError(
                "parallel.pp", "model.tie_embeddings puts one weight on the first and last stage; use pp=1"
            )
        stage = PipelineStageModule(model, rt.pp_rank, dims.pp)
        module = stage
    if dims.tp > 1:
        apply_tensor_parallel(module, meshes.world["tp"])
    apply_expert_parallel(module, dims, meshes, cfg.parallel)
    apply_data_parallel(module, dims, meshes)
    if stage is None:
        return ParallelModel(module, None, None)
    inputs, outputs = _stage_io(cfg, dims.dp, stage, rt.device)
    pipeline_stage = PipelineStage(
        module, rt.pp_rank, dims.pp, rt.device, input_args=inputs, output_args=outputs, group=rt.group("pp")
    )
    schedule = Schedule1F1B(pipeline_stage, cfg.train.grad_accum, loss_fn=loss_fn)
    return ParallelModel(module, schedule, stage)


def _stage_io(cfg: Config, dp: int, stage: PipelineStageModule, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Example input and output of one micro-batch on this stage. Given up front, the schedule
    never runs a shape-inference forward, which would feed garbage through the MoE layers'
    global-batch counts and recorded metrics."""
    rows, seq, width = cfg.train.batch_size // dp, cfg.data.seq_len, cfg.model.d_model + stage.carry_width
    hidden = torch.empty(rows, seq, width, device=device, requires_grad=True)  # gradients flow back through it
    inputs = torch.empty(rows, seq, dtype=torch.int64, device=device) if stage.is_first else hidden
    logits_dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    logits = torch.empty(rows, seq, cfg.model.vocab_size, dtype=logits_dtype, device=device, requires_grad=True)
    return inputs, logits if stage.is_last else hidden
