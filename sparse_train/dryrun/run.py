"""One rank of a planned run, executed on fake tensors: the real trainer, no memory, no GPU.

`dry_run(cfg, world, rank)` starts a fake process group of `world` ranks (collectives return
at once, moving nothing), builds the trainer as a real run would (meta construction, the
layout, this rank's shards materialised as fake CUDA tensors), and runs, op by op under
`checks.Checks`:

    first step        a step that is not reported, with its one-time set-up (a pipeline's
                      shape vote, the optimizer's state); host reads allowed
    train step        forward, backward, gradient norm, optimizer step; not reported, so no
                      host read and no CPU tensor is allowed, and collectives only on the device
    reported step     the same with its metrics reduced and read (a logging step)
    evaluation        the validation forward and its reduced loss
    checkpoint save   the trainer's save: the non-finite check, the state dicts, DCP's save
                      planning, the digests gathered and the manifest; only the shards' bytes
                      are not written (fake tensors have none: dryrun.shards keeps the index)
    resume            a new trainer resuming from that checkpoint: the checks of its files,
                      the ranks' agreement, DCP's load planning and the state dicts' setters
    init from         a fresh trainer started from that checkpoint's weights (`--init-from RUN`)

Routing is balanced where the real split sizes are data-dependent (parallel.balanced).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
import torch.distributed as dist
import yaml

from sparse_train.config import Config, compose_config
from sparse_train.data.dataset import TokenData
from sparse_train.dryrun import fake_cuda, gpu_attention, lazy_chunks
from sparse_train.dryrun.checks import Checks, Finding, served_devices, traceback_site
from sparse_train.dryrun.measure import ParameterShard, StepCost, measuring, parameter_shards
from sparse_train.dryrun.shards import ShardsInMemory, load_without_collectives
from sparse_train.parallel import balanced
from sparse_train.parallel.collective_record import CollectiveCall
from sparse_train.parallel.dims import ParallelDims
from sparse_train.parallel.runtime import DistributedRuntime, process_group_backend
from sparse_train.train import checkpoint as ckpt
from sparse_train.train import sharded


@dataclass
class DryRunReport:
    world: int
    rank: int
    device: str
    backend: str
    layout: str = ""
    phases: list[str] = field(default_factory=list)  # those that ran to the end
    findings: list[Finding] = field(default_factory=list)
    collectives: dict[str, dict[str, int]] = field(default_factory=dict)  # phase -> op -> calls
    host_reads: dict[str, int] = field(default_factory=dict)  # phase -> reads seen
    local_parameters: int = 0
    step_cost: StepCost | None = None  # the unreported train step's peak memory and FLOPs (measure=True)
    collective_calls: dict[str, list[CollectiveCall]] = field(default_factory=dict)  # phase -> calls, in order
    parameter_shards: list[ParameterShard] = field(default_factory=list)  # how the layout split each (measure=True)

    @property
    def ok(self) -> bool:
        return not self.findings

    def summary(self) -> str:
        """For a person: one line when clean, else one line per finding."""
        head = f"dry run, rank {self.rank} of {self.world} ({self.layout or 'layout not built'}, {self.device}):"
        if self.ok:
            per_step = sum(self.collectives.get("train step", {}).values())
            cost = ""
            if self.step_cost is not None:
                cost = (
                    f"; the step's peak {self.step_cost.peak_total / 1e9:.2f} GB, "
                    f"{self.step_cost.flops / 1e9:,.4g} GFLOP"
                )
            return f"{head} ok ({', '.join(self.phases)}; {per_step} collectives in an unreported step{cost})"
        return "\n".join(f"{head} {finding.line()}" for finding in self.findings)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "world": self.world,
            "rank": self.rank,
            "device": self.device,
            "backend": self.backend,
            "layout": self.layout,
            "phases": self.phases,
            "findings": [f.line() for f in self.findings],
            "collectives": self.collectives,
            "host_reads": self.host_reads,
            "local_parameters": self.local_parameters,
            "collective_bytes": self.collective_bytes(),
            **({"step_cost": dataclasses.asdict(self.step_cost)} if self.step_cost is not None else {}),
        }

    def collective_bytes(self) -> dict[str, dict[str, int]]:
        """phase -> op -> the bytes of the calls' largest tensors, summed (CollectiveCall)."""
        out: dict[str, dict[str, int]] = {}
        for phase, calls in self.collective_calls.items():
            for call in calls:
                out.setdefault(phase, {})
                out[phase][call.op] = out[phase].get(call.op, 0) + call.nbytes
        return out


def synthetic_data(seq_len: int, sequences: int) -> TokenData:
    """Token ids (below 32: valid for any tokenizer) for a few steps' batches; the dry run never
    looks at their values."""
    tokens = (sequences + 1) * (seq_len + 1) * 4
    ids = np.tile(np.arange(32, dtype=np.uint16), tokens // 32 + 1)[:tokens]  # tiling: fast at 10^8 tokens
    return TokenData(ids, ids.copy(), "dry run")


@contextlib.contextmanager
def _fake_world(world: int, rank: int, devices_per_node: int):
    """A fake process group, with the environment torchrun would give this rank."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    env = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank % devices_per_node)}
    with mock.patch.dict(os.environ, env):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
        try:
            yield
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


def dry_run(
    cfg: Config,
    world: int,
    rank: int = 0,
    *,
    device: str = "cuda",
    backend: str | None = None,
    devices_per_node: int = 8,
    measure: bool = False,
    phases_to_run: int | None = None,
    initialise: bool = True,
) -> DryRunReport:
    """Run `rank` of a `world`-rank layout of `cfg` on fake tensors (module docstring).
    `measure`: also the unreported train step's peak memory and FLOPs (report.step_cost,
    dryrun.measure); `phases_to_run`: only the first that many phases (a planner needs three);
    `initialise=False`: the weights are not drawn (a measuring run never reads their values, and
    drawing them op by op on fake tensors is most of a large rank's build)."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode

    from sparse_train.train.trainer import Trainer
    from sparse_train.train.weights import CheckpointWeights

    backend = backend or process_group_backend(device)
    report = DryRunReport(world=world, rank=rank, device=device, backend=backend)
    on_device = {device}
    served = served_devices(backend)
    checks = Checks(device_type=device)
    patches = contextlib.ExitStack()
    if device == "cuda":
        patches.enter_context(fake_cuda.patched(devices_per_node))
        patches.enter_context(gpu_attention.patched())  # the GPU's attention kernels, not the math fallback
    patches.enter_context(lazy_chunks.patched())
    if not initialise:
        patches.enter_context(mock.patch("sparse_train.models.transformer.init_parameters", _leave_uninitialised))
    # the meshes hold real rank tables: built with fake mode off
    patches.enter_context(mock.patch("torch.distributed.all_gather_object", _all_gather_object_locally))
    patches.enter_context(mock.patch("torch.distributed.broadcast_object_list", _broadcast_object_list_locally))
    patches.enter_context(mock.patch("torch.distributed.gather_object", _gather_object_locally))
    shards = ShardsInMemory()
    patches.enter_context(mock.patch.object(sharded, "save", shards.save))
    patches.enter_context(mock.patch.object(sharded, "save_async", shards.save_async))
    patches.enter_context(mock.patch.object(sharded, "_reader", shards.reader))
    patches.enter_context(mock.patch.object(sharded, "stored_tensors", shards.stored_tensors))
    patches.enter_context(mock.patch.object(sharded.dcp, "load", load_without_collectives(sharded.dcp.load)))
    # one fake process group for the three trainers of the run; _fake_world ends it
    patches.enter_context(mock.patch.object(DistributedRuntime, "close", lambda self: None))
    patches.enter_context(mock.patch.object(ckpt, "_side_files", _side_files_of_real_values(ckpt._side_files)))
    patches.enter_context(
        mock.patch.object(ckpt, "read_trainer_state", _trainer_state_of_this_process(ckpt.read_trainer_state))
    )
    patches.enter_context(warnings.catch_warnings())
    # the resumed numpy RNG state is converted from a fake tensor: garbage of the right size, harmless here
    warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
    patches.enter_context(
        mock.patch.object(ParallelDims, "build_meshes", fake_cuda.real_values(ParallelDims.build_meshes))
    )
    overrides = [f"train.device={device}", "logging.tensorboard=false", "logging.plots=false", "logging.progress=false"]
    cfg = compose_config(yaml.safe_load(cfg.to_yaml()), overrides)
    data = synthetic_data(cfg.data.seq_len, cfg.train.batch_size * cfg.train.grad_accum)
    with tempfile.TemporaryDirectory(prefix="sparse-train-dry-run-") as run_dir:
        with _fake_world(world, rank, devices_per_node), patches:
            trainers: list[Trainer] = []
            saved: list[Path] = []

            def start(**kwargs: Any) -> Trainer:
                trainer = Trainer(cfg, kwargs.pop("run_dir", Path(run_dir)), data=data, log=lambda msg: None, **kwargs)
                trainers.append(trainer)
                return trainer

            def build() -> None:
                trainer = start()
                report.layout = trainer.layout()
                balanced.install(trainer.model)
                report.local_parameters = sum(_local_numel(p) for p in trainer.model.parameters())
                if measure:
                    report.parameter_shards = parameter_shards(trainer.model)
                shards.whole_model = _whole_model(trainer.cfg)

            def evaluate() -> None:
                trainers[0].engine.evaluate(trainers[0].val_batches, trainers[0].autocast)

            def save() -> None:
                trainer = trainers[0]
                # No other process writes the main rank's part (manifest, side files): this one does.
                trainer.is_main = True
                trainer.save()
                trainer.wait_for_checkpoint()
                saved.append(trainer.checkpoints_dir / ckpt.step_dir_name(trainer.step))

            phases = [  # name, what runs, host reads allowed, devices collectives may use, CPU tensors allowed
                ("build", build, True, served, True),
                # one-time set-up (a pipeline's shape vote, the optimizer's state) may read, once
                ("first step", lambda: trainers[0].train_step(report=False), True, on_device, True),
                ("train step", lambda: trainers[0].train_step(report=False), False, on_device, False),
                ("reported step", lambda: trainers[0].train_step(report=True), True, on_device, True),
                ("evaluation", evaluate, True, on_device, True),
                ("checkpoint save", save, True, served, True),
                ("resume", lambda: start(resume=str(saved[0])), True, served, True),
                ("init from", lambda: start(run_dir=Path(run_dir) / "init-from",
                                            init_weights=CheckpointWeights(saved[0])), True, served, True),
            ]  # fmt: skip
            if measure:
                report.step_cost = StepCost()
                name, run, *rest = phases[2]
                phases[2] = (name, measuring(run, lambda: trainers[0], device, report.step_cost, checks), *rest)
            phases = phases[:phases_to_run]
            with FakeTensorMode(allow_non_fake_inputs=True), checks:
                for name, run, reads, devices, cpu_tensors in phases:
                    try:
                        with checks.phase(name, reads=reads, collective_devices=devices, cpu_tensors=cpu_tensors):
                            run()
                    except (DataDependentOutputException, DynamicOutputShapeException) as err:
                        # a read the checks could not answer: the shape of a result depends on values
                        checks.findings.append(
                            Finding(name, "data-dependent shape", str(err.func), traceback_site(err))
                        )
                        break
                    report.phases.append(name)
            for trainer in trainers:
                trainer.close()
    report.findings = list(checks.findings)
    report.host_reads = dict(checks.host_reads)
    report.collective_calls = dict(checks.collective_calls)
    for (phase, op), calls in checks.collectives.items():
        report.collectives.setdefault(phase, {})[op] = calls
    return report


def stage_ranks(cfg: Config, world: int) -> list[int]:
    """The first rank of every pipeline stage: the ranks whose code differs (stages hold different
    blocks; the ranks within a stage differ only in their shards)."""
    pp = ParallelDims.from_config(cfg.parallel, world).pp
    return [stage * (world // pp) for stage in range(pp)]


def _leave_uninitialised(*args: Any, **kwargs: Any) -> None:
    """models.init.init_parameters for a run whose values are never read."""


def _all_gather_object_locally(object_list: list[Any], obj: Any, group: Any = None) -> None:
    """all_gather_object on a fake group: pickled objects cannot travel as fake tensors, and no
    other rank exists to send one, so every rank's slot gets this rank's object (under a
    pipeline, the other stages' layer statistics are then this stage's: shapes only matter).
    Object collectives are therefore not checked for their device; the training step has none."""
    object_list[:] = [obj] * len(object_list)


def _broadcast_object_list_locally(object_list: list[Any], *args: Any, **kwargs: Any) -> None:
    """broadcast_object_list on a fake group: every rank keeps its own objects (see above)."""


def _side_files_of_real_values(side_files):
    """checkpoint._side_files for the dry run: the trainer state holds fake tensors (its RNG
    states, made under fake mode), which cannot be pickled; zeros of their shape are."""
    from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
    from torch.utils._pytree import tree_map

    def real(value: Any) -> Any:
        return torch.zeros(value.shape, dtype=value.dtype) if isinstance(value, FakeTensor) else value

    def call(state: dict[str, Any], *args: Any) -> dict[str, bytes]:
        with unset_fake_temporarily():
            return side_files(tree_map(real, state), *args)

    return call


def _trainer_state_of_this_process(read_trainer_state):
    """checkpoint.read_trainer_state for the dry run: real tensors (fake mode off), and this
    process's own torch RNG state in place of the saved one (zeros: see above), which the
    generator would not take."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    def call(path: Path) -> dict[str, Any]:
        with unset_fake_temporarily():
            state = read_trainer_state(path)
            state["rng"]["torch"] = torch.get_rng_state()
        return state

    return call


def _gather_object_locally(obj: Any, object_gather_list: list[Any] | None = None, *args: Any, **kwargs: Any) -> None:
    """gather_object on a fake group: the destination's slots get its own object (see above)."""
    if object_gather_list is not None:
        object_gather_list[:] = [obj] * len(object_gather_list)


def _whole_model(cfg: Config) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of every tensor of the model's state dict, from a model without storage."""
    from sparse_train.models.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.moe, cfg.router, cfg.fff)
    return {name: (tuple(t.shape), t.dtype) for name, t in model.state_dict().items()}


def _local_numel(t: torch.Tensor) -> int:
    from torch.distributed.tensor import DTensor

    return (t.to_local() if isinstance(t, DTensor) else t).numel()
