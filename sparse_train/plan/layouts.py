"""The layouts a cluster admits for a model: every (dp_replicate, dp_shard, ep, tp, pp,
micro-batch, accumulation) whose run the trainer's own validation accepts (Config validation
and ParallelDims.check_model), the rest with the reason it gives.

Candidates: tp within a node (a power of two dividing the GPUs per node), pp up to the blocks,
ep a divisor of the data-parallel ranks, dp_replicate a power of two (HSDP replicas), the
micro-batch per rank a power of two, and activation checkpointing of no block, every block, or
(when the model has both) only its sparse or only its dense blocks; the global batch fixes the
accumulation, and with accumulation (and no pipeline) FSDP reduces once per step or after every
micro-batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any

from sparse_train.config import Config, ConfigError
from sparse_train.errors import UsageError
from sparse_train.parallel.dims import ParallelDims


@dataclass(frozen=True)
class Layout:
    dp_replicate: int
    dp_shard: int
    ep: int
    tp: int
    pp: int
    micro_batch: int  # sequences per data-parallel rank per micro-batch
    grad_accum: int  # micro-batches per step
    activation_checkpointing: str = "none"  # train.activation_checkpointing: none, all, sparse, dense
    grad_sync: str = "step"  # parallel.grad_sync: FSDP reduces once per step, or every micro-batch

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp

    def overrides(self) -> list[str]:
        """The config fields that make a run of this layout."""
        return [
            f"parallel.dp_replicate={self.dp_replicate}",
            f"parallel.dp_shard={self.dp_shard}",
            f"parallel.ep={self.ep}",
            f"parallel.tp={self.tp}",
            f"parallel.pp={self.pp}",
            f"train.batch_size={self.micro_batch * self.dp}",
            f"train.grad_accum={self.grad_accum}",
            f"train.activation_checkpointing={self.activation_checkpointing}",
            f"parallel.grad_sync={self.grad_sync}",
        ]

    def name(self) -> str:
        return (
            f"dpr{self.dp_replicate}-dps{self.dp_shard}-ep{self.ep}-tp{self.tp}-pp{self.pp}"
            f"-mb{self.micro_batch}-ga{self.grad_accum}-ac{self.activation_checkpointing}"
            + ("-rsmb" if self.grad_sync == "micro_batch" else "")
        )

    def to_dict(self) -> dict[str, int | str]:
        return asdict(self)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _powers_of_two(limit: int) -> list[int]:
    return [1 << i for i in range(limit.bit_length()) if (1 << i) <= limit]


def sequences_per_step(global_batch_tokens: int, seq_len: int) -> int:
    if global_batch_tokens % seq_len:
        below = global_batch_tokens // seq_len * seq_len
        raise UsageError(
            f"--global-batch-tokens {global_batch_tokens} is not a whole number of {seq_len}-token sequences; "
            f"the largest below that is: {below}"
        )
    return global_batch_tokens // seq_len


def checkpointing_modes(cfg: Config) -> list[str]:
    """The activation-checkpointing choices that differ for the model: none, all, and per block
    kind when it has both dense and sparse blocks."""
    sparse = {cfg.model.ffn != "dense" and cfg.model.is_sparse_layer(i) for i in range(cfg.model.n_layers)}
    return ["none", "all", "sparse", "dense"] if len(sparse) == 2 else ["none", "all"]


def candidate_layouts(cfg: Config, gpus: int, gpus_per_node: int, sequences: int) -> list[Layout]:
    """Every candidate of the module docstring for `gpus` ranks and `sequences` per step."""
    out = []
    modes = checkpointing_modes(cfg)
    for tp in (t for t in _powers_of_two(gpus_per_node) if gpus % t == 0 and gpus_per_node % t == 0):
        for pp in (p for p in _divisors(gpus // tp) if p <= cfg.model.n_layers):
            dp = gpus // (tp * pp)
            for ep in _divisors(dp):
                for dp_replicate in (r for r in _powers_of_two(dp) if dp % r == 0):
                    per_rank, left = divmod(sequences, dp)
                    if left:
                        continue
                    for micro in (m for m in _powers_of_two(per_rank) if per_rank % m == 0):
                        accum = per_rank // micro
                        syncs = ("step", "micro_batch") if pp == 1 and accum > 1 else ("step",)
                        parallel = (dp_replicate, dp // dp_replicate, ep, tp, pp, micro, accum)
                        out += [Layout(*parallel, mode, sync) for mode in modes for sync in syncs]
    return out


def check_layout(cfg: Config, layout: Layout) -> tuple[Config | None, str | None]:
    """(the run's config, None) if the trainer's validation accepts `layout`, else (None, why).

    The same checks as `compose_config(cfg, layout.overrides())` then ParallelDims (the parallel
    and train sections' own, the cross-section ones, the layout's against the model), without
    re-reading the sections the layout leaves alone: thousands of layouts per plan."""
    try:
        parallel = _section(
            cfg.parallel, "parallel", dp_replicate=layout.dp_replicate, dp_shard=layout.dp_shard,
            ep=layout.ep, tp=layout.tp, pp=layout.pp, grad_sync=layout.grad_sync,
        )  # fmt: skip
        train = _section(
            cfg.train, "train", batch_size=layout.micro_batch * layout.dp, grad_accum=layout.grad_accum,
            activation_checkpointing=layout.activation_checkpointing,
        )  # fmt: skip
        run = dataclasses.replace(cfg, parallel=parallel, train=train)
        ParallelDims.from_config(run.parallel, layout.world).check_model(run)
    except ConfigError as err:
        return None, str(err)
    return run, None


def _section(section: Any, name: str, **changes: int | str) -> Any:
    try:
        return dataclasses.replace(section, **changes)
    except ConfigError as err:
        raise err.under(name) from None
