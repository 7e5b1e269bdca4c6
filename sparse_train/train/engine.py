"""Forward and backward of one optimizer step over its micro-batches, on one process or many.

The trainer owns the loop (data, optimizer, schedule, logging, checkpoints); the engine owns
how a step's micro-batches reach the model:

    single process  each micro-batch forward + backward in turn
    data/tensor/    the same, on this rank's share of every micro-batch (batch rows split over
    expert parallel the data-parallel ranks); FSDP2 reduces gradients on the last micro-batch
    pipeline        all micro-batches through the 1F1B schedule of this rank's stage

and, when asked (Engine.reduce, at logging steps), reduces what every rank measured into the
step's metrics, identical on every rank. Until then a step's measurements stay on the device,
unreduced: a step that is not logged costs no collective and no host read for them.

Global batch: `train.batch_size` sequences per micro-batch in total, whatever the layout, so
one config trains the same model on 1 or N processes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sparse_train.config import Config
from sparse_train.models.losses import GlobalBatchCounts
from sparse_train.models.moe import MoELayer
from sparse_train.models.sparse import SparseAux, SparseFFN
from sparse_train.models.transformer import Transformer
from sparse_train.parallel.runtime import DistributedRuntime
from sparse_train.parallel.state import clip_grad_norm_, full_gradients, full_state_dict, load_full_state_dict
from sparse_train.train.loss import aux_loss_names, lm_loss, total_loss
from sparse_train.train.recompute import checkpoint_blocks

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class LocalStep:
    """What one step (or evaluation) measured on this rank, on the device and not reduced."""

    sums: dict[str, torch.Tensor]  # per loss key, summed over micro-batches (fp64 scalars)
    finite: torch.Tensor  # bool scalar: every micro-batch's loss on this rank was finite
    per_layer: list[list[SparseAux]]  # per micro-batch, this rank's sparse layers' aux
    micro_batches: int


@dataclass
class StepResult:
    losses: dict[str, float]  # means over the step's micro-batches (and ranks)
    finite: bool  # every micro-batch's loss was finite
    layer_stats: list[dict[str, Any]]  # per sparse layer (model order): kind, load [E], metrics {name: value}
    layer_names: list[str]


class Engine:
    def __init__(self, model: Transformer, cfg: Config, runtime: DistributedRuntime | None) -> None:
        self.cfg = cfg
        self.runtime = runtime
        # the whole model's sparse layers, named before a pipeline split keeps only this stage's
        self.all_sparse_names = _sparse_layer_names(model)
        self.schedule = None
        self.stage = None
        self.grad_sync = cfg.parallel.grad_sync
        # recomputation first: inside the FSDP units the layout makes around the blocks (torchtitan's order)
        checkpoint_blocks(model, cfg.train.activation_checkpointing)
        if runtime is None:
            self.module: nn.Module = model
        else:
            from sparse_train.parallel.parallelize import parallelize

            parallel = parallelize(model, cfg, runtime, loss_fn=lm_loss)
            self.module, self.schedule, self.stage = parallel.module, parallel.schedule, parallel.stage
        self.aux_names = aux_loss_names(cfg)
        self.mtp_coef = cfg.model.mtp_loss_coef
        self.loss_keys = ("loss", "lm_loss", *self.aux_names, *(("mtp_loss",) if cfg.model.mtp_depth else ()))
        self.num_sparse_layers = len(model.sparse_layers)

    # ---- layout helpers -------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.runtime.device if self.runtime else next(self.module.parameters()).device

    def _group(self, dim: str) -> dist.ProcessGroup | None:
        if self.runtime is None:
            return None
        size = {"dp": self.runtime.dims.dp, "pp": self.runtime.dims.pp}[dim]
        return self.runtime.group(dim) if size > 1 else None

    def local_share(self, batch: Batch) -> Batch:
        """This rank's rows of a global micro-batch (all of it on one data-parallel rank)."""
        if self.runtime is None or self.runtime.dims.dp == 1:
            return batch
        dp, rank = self.runtime.dims.dp, self.runtime.dp_rank
        rows = batch[0].shape[0] // dp
        return batch[0][rank * rows : (rank + 1) * rows], batch[1][rank * rows : (rank + 1) * rows]

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def reset_balance_counts(self) -> None:
        for m in self.module.modules():
            if isinstance(m, SparseFFN) and isinstance(m.count_sync, GlobalBatchCounts):
                m.count_sync.reset()

    # ---- one step -------------------------------------------------------------------------
    def forward_backward(
        self, micro_batches: list[Batch], autocast: Callable[[], contextlib.AbstractContextManager]
    ) -> LocalStep:
        """Gradients of the step's mean loss accumulated into .grad; what this rank measured,
        left on the device (reduce() makes metrics of it)."""
        self.reset_balance_counts()
        micro_batches = [tuple(t.to(self.device) for t in self.local_share(b)) for b in micro_batches]
        if self.schedule is not None:
            sums, finite, per_layer = self._pipelined(micro_batches, autocast)
        else:
            sums, finite, per_layer = self._direct(micro_batches, autocast)
        return LocalStep(sums, finite, per_layer, len(micro_batches))

    def _zeros(self) -> dict[str, torch.Tensor]:
        return {key: torch.zeros((), dtype=torch.float64, device=self.device) for key in self.loss_keys}

    def _direct(self, micro_batches: list[Batch], autocast):
        """Losses and the finite flag accumulate on the device: no host read per micro-batch."""
        accum = len(micro_batches)
        sums = self._zeros()
        per_layer: list[list[SparseAux]] = []
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        fsdp = hasattr(self.module, "set_requires_gradient_sync")
        every_micro_batch = self.grad_sync == "micro_batch"
        for j, (inputs, targets) in enumerate(micro_batches):
            if fsdp:  # reduce gradients after the last micro-batch (parallel.grad_sync: or every one)
                self.module.set_requires_gradient_sync(every_micro_batch or j == accum - 1)
            with autocast():
                output = self.module(inputs)
            parts = self.loss_of(output, targets)
            # A non-finite loss still runs its backward (every rank must run the same collectives);
            # the gradient norm turns non-finite and the step is skipped.
            finite &= torch.isfinite(parts.loss)
            (parts.loss / accum).backward()
            for key, value in parts.values().items():
                sums[key] += value.detach().double()
            per_layer.append(output.sparse_aux)
            del output, parts  # this micro-batch's logits go before the next one's forward, not after it
        return sums, finite, per_layer

    def loss_of(self, output, targets: torch.Tensor):
        """The training objective of one micro-batch (LM loss + sparse layers' losses), LossParts."""
        return total_loss(output, targets, self.aux_names, self.mtp_coef)

    def _pipelined(self, micro_batches: list[Batch], autocast):
        stage = self.stage
        stage.recorded_aux.clear()
        inputs = torch.cat([b[0] for b in micro_batches])
        targets = torch.cat([b[1] for b in micro_batches])
        losses: list[torch.Tensor] = []
        with autocast():
            if stage.is_first:
                self.schedule.step(inputs, target=targets if stage.is_last else None, losses=losses)
            elif stage.is_last:
                self.schedule.step(target=targets, losses=losses)
            else:
                self.schedule.step()
        sums = self._zeros()
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        for loss in losses:  # the last stage's
            sums["lm_loss"] += loss.detach().double()
            finite &= torch.isfinite(loss.detach())
        sums["loss"] += sums["lm_loss"]
        for step_aux in stage.recorded_aux:
            for a in step_aux:
                sums["loss"] += a.objective.double()
                for name in self.aux_names:
                    sums[name] += a.losses[name].double()
        return sums, finite, list(stage.recorded_aux)

    def reduce(self, local: LocalStep) -> StepResult:
        """Means over micro-batches, layers and data-parallel ranks; pipeline stages' parts summed
        (collective). The one place a step's metrics are read back to the host: once, after
        their reductions."""
        sums, finite, accum = local.sums, local.finite, local.micro_batches
        stats = _layer_stats(local.per_layer, accum)
        n_losses = len(self.loss_keys)
        n_layers = max(self.num_sparse_layers, 1)
        if self.schedule is None:  # per micro-batch means over layers already (total_loss)
            values = [sums[k] / accum for k in self.loss_keys]
        else:  # sums over this stage's layers: the layer mean needs the whole pipeline's sum
            values = [sums["loss"] / accum, sums["lm_loss"] / accum]
            values += [sums[name] / accum / n_layers for name in self.aux_names]
        # collectives on the training device (NCCL serves no CPU tensors)
        vector = torch.stack([*values, (~finite).double()])
        if (pp := self._group("pp")) is not None:
            dist.all_reduce(vector, group=pp)
        if (dp := self._group("dp")) is not None:
            dist.all_reduce(vector, group=dp)
            vector[:n_losses] /= self.runtime.dims.dp
        stats = self._stats_to_host(stats, dp)
        if pp is not None:
            gathered: list[Any] = [None] * dist.get_world_size(pp)
            dist.all_gather_object(gathered, stats, group=pp)
            stats = [s for part in gathered for s in part]
        host = vector.tolist()
        losses = dict(zip(self.loss_keys, host[:n_losses], strict=True))
        return StepResult(losses, host[n_losses] == 0, stats, self.all_sparse_names)

    def _stats_to_host(self, stats: list[dict[str, Any]], dp: dist.ProcessGroup | None) -> list[dict[str, Any]]:
        """Every layer's load and metrics (averaged over the data-parallel ranks, in one packed
        all-reduce) as CPU tensors and floats, read back in one copy."""
        keys = [sorted(s["metrics"]) for s in stats]
        parts = [
            torch.cat([s["load"].double(), *(s["metrics"][k].double().reshape(1) for k in ks)])
            for s, ks in zip(stats, keys, strict=True)
        ]
        if not parts:
            return stats
        packed = torch.cat(parts)
        if dp is not None:
            dist.all_reduce(packed, group=dp)
            packed /= self.runtime.dims.dp
        packed = packed.cpu()
        out = []
        for s, ks, part in zip(stats, keys, packed.split([len(p) for p in parts]), strict=True):
            n = s["load"].numel()
            out.append(
                {"kind": s["kind"], "load": part[:n].float(), "metrics": dict(zip(ks, part[n:].tolist(), strict=True))}
            )
        return out

    def layer_names(self) -> list[str]:
        """Names of the whole model's sparse layers ("block<i>"), in block order."""
        return self.all_sparse_names

    def set_step(self, step: int) -> None:
        """The optimizer step about to run, for routers whose choice depends on it (selective
        Sinkhorn's steps); a Python int on every router: no device work, and an activation
        checkpoint's recomputation routes as its forward did."""
        for layer in self.module.modules():
            if isinstance(layer, MoELayer):
                layer.router.step = step

    def update_expert_bias(self, skipped: torch.Tensor) -> None:
        """After the optimizer step: every biased router's counts of the step, summed over the
        data-parallel ranks (one all-reduce for all layers, on the device; the global batch, so
        every layout updates alike), move its expert bias. Nothing when no router has one."""
        layers = [m for m in self.module.modules() if isinstance(m, MoELayer) and m.router.expert_bias_E is not None]
        if not layers:
            return
        counts_LE = torch.stack([layer.take_bias_counts() for layer in layers])
        if (dp := self._group("dp")) is not None:
            dist.all_reduce(counts_LE, group=dp)
        for layer, counts_E in zip(layers, counts_LE, strict=True):
            layer.update_expert_bias(counts_E, skipped)

    # ---- gradients, evaluation, state -----------------------------------------------------
    def clip_grad_norm(self, max_norm: float | None, poison: torch.Tensor | None = None) -> torch.Tensor:
        """The global gradient norm (a device scalar) after clipping to `max_norm`; infinite on
        every rank when `poison` (this rank's non-finite flag) is true on any."""
        pipeline_stages = self.runtime.dims.pp if self.runtime else 1
        return clip_grad_norm_(self.parameters(), max_norm, pipeline_stages, poison)

    @torch.no_grad()
    def evaluate(self, batches: list[Batch], autocast) -> tuple[float, list[torch.Tensor]]:
        """Mean validation LM loss over `batches` (global micro-batches), and per-layer expert load."""
        self.module.eval()
        self.reset_balance_counts()
        batches = [tuple(t.to(self.device) for t in self.local_share(b)) for b in batches]
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        per_layer: list[list[SparseAux]] = []
        try:
            if self.schedule is not None:
                total, per_layer = self._evaluate_pipelined(batches, autocast)
            else:
                for inputs, targets in batches:
                    with autocast():
                        output = self.module(inputs)
                    total += lm_loss(output.logits_BSV, targets).double()
                    per_layer.append(output.sparse_aux)
        finally:
            self.module.train()
        sums = {**self._zeros(), "loss": total, "lm_loss": total}
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        result = self.reduce(LocalStep(sums, finite, per_layer, len(batches)))
        return result.losses["lm_loss"], [s["load"] for s in result.layer_stats]

    def _evaluate_pipelined(self, batches: list[Batch], autocast) -> tuple[torch.Tensor, list[list[SparseAux]]]:
        stage, accum = self.stage, self.cfg.train.grad_accum
        stage.recorded_aux.clear()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for start in range(0, len(batches), accum):
            group = batches[start : start + accum]
            inputs, targets = torch.cat([b[0] for b in group]), torch.cat([b[1] for b in group])
            losses: list[torch.Tensor] = []
            with autocast():
                if stage.is_first:
                    self.schedule.eval(inputs, target=targets if stage.is_last else None, losses=losses)
                elif stage.is_last:
                    self.schedule.eval(target=targets, losses=losses)
                else:
                    self.schedule.eval()
            for loss in losses:
                total += loss.detach().double()
        return total, list(stage.recorded_aux)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The single-device model's weights, on every rank (collective)."""
        return full_state_dict(self.module, self._group("pp"))

    def full_gradients(self) -> dict[str, torch.Tensor]:
        """The whole model's current gradients, unsharded, on every rank (collective)."""
        return full_gradients(self.module, self._group("pp"))

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer state of the whole model keyed by parameter name, on every rank (collective)."""
        from sparse_train.train.checkpoint import optimizer_state

        state = optimizer_state(self.module, optimizer, full=True)
        state["state"] = {k: {n: _cpu(v) for n, v in per.items()} for k, per in state["state"].items()}
        if (pp := self._group("pp")) is None:
            return state
        parts: list[Any] = [None] * dist.get_world_size(pp)
        dist.all_gather_object(parts, state, group=pp)
        merged: dict[str, Any] = {"state": {}, "param_groups": [dict(g, params=[]) for g in parts[0]["param_groups"]]}
        for part in parts:
            merged["state"].update(part["state"])
            for group, theirs in zip(merged["param_groups"], part["param_groups"], strict=True):
                group["params"].extend(theirs["params"])
        return merged

    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_full_state_dict(self.module, state)


def _sparse_layer_names(module: nn.Module) -> list[str]:
    """Names ("block<i>", "mtp<k>" for multi-token prediction module k) of the sparse layers of
    `module`, in the order of ModelOutput.sparse_aux."""
    names = [name.split(".") for name, m in module.named_modules() if isinstance(m, SparseFFN)]
    return [f"{'mtp' if parts[0] == 'mtp' else 'block'}{parts[1]}" for parts in names]


def _cpu(v: Any) -> Any:
    return v.cpu() if isinstance(v, torch.Tensor) else v


def _layer_stats(per_layer: list[list[SparseAux]], accum: int) -> list[dict[str, Any]]:
    """Per sparse layer of this rank, means over the micro-batches (on the device): kind, load, metrics."""
    stats: list[dict[str, Any]] = []
    for step_aux in per_layer:
        for i, aux in enumerate(step_aux):
            if len(stats) <= i:
                stats.append({"kind": aux.kind, "load": torch.zeros_like(aux.load, dtype=torch.float32), "metrics": {}})
            stats[i]["load"] += aux.load.detach().float() / accum
            for key, value in aux.metrics.items():
                stats[i]["metrics"][key] = stats[i]["metrics"].get(key, 0.0) + value.detach().double() / accum
    return stats
