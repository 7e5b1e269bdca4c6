"""`sparse-train bench dispatch`: the expert-parallel token exchange of the tiny model on gloo.

For each EP size, N processes on this host train `configs/tiny-moe.yaml` (global_batch
balancing, the same global batch as one process) for a few steps, and one process trains it
alone for comparison. One JSON object per case:

  bytes_sent_per_step     token payload the all-to-alls sent to other ranks in one optimizer
                          step, summed over ranks, MoE layers and micro-batches, forward and
                          backward (the backward sends the same rows back)
  bytes_min_per_step      the least any dispatcher could send: each token once per distinct
                          remote rank holding one of its experts, there and back
  bytes_ratio_vs_min      bytes_sent_per_step / bytes_min_per_step (1.00 with deduplication)
  remote_peers_per_token  distinct other ranks a token is sent to, mean over tokens (at most
                          router.group_top_k with group-limited routing whose groups are the ranks)
  all_to_all_share        wall time inside the token all-to-alls (counts, rows, routing
                          weights, combine; forward and backward) / step time, mean over ranks
  all_to_all_call_bytes_per_rank
                          each rank's all-to-all calls of one step (every call's larger buffer,
                          the local block included; counts, rows, routing weights, combine,
                          forward and backward): the per-call bytes the dry run and
                          `sparse-train plan` count. With --balanced-routing every rank's
                          equals the planner's prediction (`sparse-train bench plan --collectives`)
  tokens_per_s            global tokens per second, median step after warm-up
  single_process_tokens_per_s, speedup_vs_single_process
                          the same config in one process, measured in the same command

On one 2-core machine N processes share the cores, so tokens/s says what the exchange costs,
not what N machines would gain. --balanced-routing replaces each dispatcher's split sizes with
perfectly balanced ones (parallel.balanced: one row per assignment, T·k/ep to each rank); the
bytes_sent/min figures, which the real routing's plan records, are then absent.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sparse_train.bench.memory import TRAIN_ONLY

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny-moe.yaml"


def _overrides(steps: int, ep: int, dedup: bool, extra: list[str]) -> list[str]:
    return [
        f"train.steps={steps}",
        *TRAIN_ONLY,
        "router.balance_scope=global_batch",
        f"parallel.ep={ep}",
        f"parallel.ep_dedup={str(dedup).lower()}",
        *extra,
    ]


def _measure(
    config_path: str,
    overrides: list[str],
    run_dir: str,
    steps: int,
    warmup: int,
    balanced_routing: bool,
    record_collectives: bool = False,
) -> dict[str, Any]:
    """Train `steps` steps on this rank; per-step times, a2a seconds and bytes after warm-up
    (and every collective's bytes by op: slow, for measuring only)."""
    import contextlib

    import torch.distributed as dist

    from sparse_train.config import load_config
    from sparse_train.parallel import balanced
    from sparse_train.parallel.collective_record import CollectiveRecorder
    from sparse_train.parallel.dispatch import AllToAllDispatcher
    from sparse_train.train.trainer import Trainer

    trainer = Trainer(load_config(config_path, overrides), Path(run_dir), log=lambda msg: None)
    if balanced_routing:
        balanced.install(trainer.model)
    dispatchers = [m.dispatcher for m in trainer.engine.module.modules() if hasattr(m, "dispatcher")]
    dispatchers = [d for d in dispatchers if isinstance(d, AllToAllDispatcher)]
    step_s, comm_s, sent, least, pairs, tokens_sent, call_bytes, collectives = [], [], [], [], [], [], [], []
    try:
        for i in range(steps):
            for d in dispatchers:
                d.stats.reset()
            if dist.is_initialized():
                dist.barrier()
            recorder = CollectiveRecorder() if record_collectives and i >= warmup else contextlib.nullcontext()
            started = time.perf_counter()
            with recorder:  # a recorded step is not a logging one (no metrics reduced), as the planner's
                trainer.train_step(report=not record_collectives)
            elapsed = time.perf_counter() - started
            if isinstance(recorder, CollectiveRecorder):
                collectives.append(recorder.bytes_by_op())
            if i >= warmup:
                step_s.append(elapsed)
                comm_s.append(sum(d.stats.comm_seconds for d in dispatchers))
                sent.append(2 * sum(d.stats.total_bytes_sent for d in dispatchers))  # forward + backward
                least.append(2 * sum(d.stats.total_bytes_min for d in dispatchers))
                pairs.append(sum(d.stats.total_remote_pairs for d in dispatchers))
                tokens_sent.append(sum(d.stats.total_tokens for d in dispatchers))
                call_bytes.append(sum(d.stats.total_call_bytes for d in dispatchers))
        cfg = trainer.cfg
        tokens = cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len
    finally:
        trainer.metrics.close()
        trainer.close()
    return {"step_s": step_s, "comm_s": comm_s, "sent": sent, "min": least, "pairs": pairs, "tokens": tokens_sent,
            "call_bytes": call_bytes, "collectives": collectives, "tokens_per_step": tokens}  # fmt: skip


def balanced_step_collectives(
    config_path: str, world: int, steps: int = 2, timeout: float = 600
) -> list[dict[str, int]]:
    """Each rank's collectives in the last of `steps` steps of `config_path`'s run on `world`
    local gloo processes (its parallel section as it is) with balanced routing: op -> the bytes
    of its calls' largest tensors, summed (parallel.collective_record, as the dry run counts)."""
    from sparse_train.launch.local import run_ranks

    overrides = [f"train.steps={steps}", "train.device=cpu", *TRAIN_ONLY]
    with tempfile.TemporaryDirectory() as tmp:
        ranks = run_ranks(_measure, world, config_path, overrides, tmp, steps, steps - 1, True, True, timeout=timeout)
    return [r["collectives"][-1] for r in ranks]


def _case(
    config: Path, ep: int, dedup: bool, steps: int, warmup: int, single_tps: float, extra: list[str], balanced: bool
) -> dict[str, Any]:
    from sparse_train.launch.local import run_ranks

    with tempfile.TemporaryDirectory() as tmp:
        overrides = _overrides(steps, ep, dedup, extra)
        ranks = run_ranks(_measure, ep, str(config), overrides, tmp, steps, warmup, balanced)
    n = len(ranks[0]["step_s"])
    step_s = [max(r["step_s"][i] for r in ranks) for i in range(n)]  # a step ends when its slowest rank does
    sent = statistics.median(sum(r["sent"][i] for r in ranks) for i in range(n))
    least = statistics.median(sum(r["min"][i] for r in ranks) for i in range(n))
    share = statistics.mean(sum(r["comm_s"]) / sum(r["step_s"]) for r in ranks)
    peers = sum(sum(r["pairs"]) for r in ranks) / max(1, sum(sum(r["tokens"]) for r in ranks))
    tps = ranks[0]["tokens_per_step"] / statistics.median(step_s)
    return {
        "layout": f"ep={ep}",
        "ep": ep,
        "world_size": ep,
        "dedup": dedup,
        "balanced_routing": balanced,
        "backend": "gloo",
        "bytes_sent_per_step": int(sent),
        "bytes_min_per_step": int(least),
        "bytes_ratio_vs_min": round(sent / least, 4) if least else None,
        "remote_peers_per_token": round(peers, 4),
        "all_to_all_call_bytes_per_rank": [int(statistics.median(r["call_bytes"])) for r in ranks],
        "overrides": extra,
        "all_to_all_share": round(share, 4),
        "tokens_per_s": round(tps, 1),
        "single_process_tokens_per_s": round(single_tps, 1),
        "speedup_vs_single_process": round(tps / single_tps, 3),
        "steps_timed": n,
    }


def run(
    eps: list[int],
    *,
    config: Path = CONFIG,
    steps: int,
    warmup: int,
    dedup_off: bool,
    as_json: bool,
    overrides: list[str] | None = None,
    balanced_routing: bool = False,
) -> list[dict[str, Any]]:
    """`overrides` (`a.b=value`) apply to every case, the single process included."""
    extra = list(overrides or [])
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    log(f"single process: {steps} steps of {config.name}")
    with tempfile.TemporaryDirectory() as tmp:
        single = _measure(str(config), _overrides(steps, 1, True, extra), tmp, steps, warmup, False)
    single_tps = single["tokens_per_step"] / statistics.median(single["step_s"])
    results = []
    for ep in eps:
        for dedup in (True, False) if dedup_off else (True,):
            log(f"ep={ep} dedup={dedup}: {ep} processes, {steps} steps")
            result = _case(config, ep, dedup, steps, warmup, single_tps, extra, balanced_routing)
            results.append(result)
            print(json.dumps(result), flush=True)
    if not as_json:
        cols = ["layout", "dedup", "bytes_sent_per_step", "remote_peers_per_token", "all_to_all_share", "tokens_per_s"]
        cols.append("speedup_vs_single_process")
        log(" | ".join(cols))
        for r in results:
            log(" | ".join(str(r[c]) for c in cols))
    return results
