"""What a finished run reports, and the way the `train` command prints it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RunSummary:
    run_dir: Path
    steps: int
    first_loss: float | None
    last_loss: float | None
    val_loss: float | None
    tokens_per_s: float
    load_imbalance: dict[str, float]  # per sparse layer: max expert (leaf) load / mean load (1.0 = even)
    nonfinite_steps: int
    checkpoint: Path | None
    params: dict[str, int] = field(default_factory=dict)
    sparse_kind: str = "moe"  # model.ffn: what load_imbalance measures (experts or FFF leaves)
    peak_memory_mb: dict[str, float] = field(default_factory=dict)  # build, step: largest over ranks; ranks


def format_summary(s: RunSummary) -> str:
    def loss(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    lines = [
        f"trained {s.steps} steps  ({s.params.get('total', 0):,} parameters, "
        f"{s.params.get('active', 0):,} active per token)",
        f"  loss          {loss(s.first_loss)} (first step) -> {loss(s.last_loss)} (last step)",
        f"  val loss      {loss(s.val_loss)}",
        f"  throughput    {s.tokens_per_s:,.0f} tokens/s",
    ]
    if s.load_imbalance:
        balance = ", ".join(f"{k} {v:.2f}" for k, v in s.load_imbalance.items())
        if s.sparse_kind == "fff":
            lines.append(f"  leaf usage    max/mean per FFF layer (1.00 = balanced): {balance}")
        else:
            lines.append(f"  expert load   max/mean per MoE layer (1.00 = balanced): {balance}")
    if s.peak_memory_mb:
        m = s.peak_memory_mb
        lines.append(
            f"  peak memory   {m['build']:,.0f} MB built, {m['step']:,.0f} MB after the first step "
            f"(largest of {m['ranks']:.0f} rank{'s' if m['ranks'] > 1 else ''}; per rank in metrics.jsonl)"
        )
    if s.nonfinite_steps:
        lines.append(f"  skipped       {s.nonfinite_steps} non-finite steps")
    lines += [
        f"  metrics       {s.run_dir / 'metrics.jsonl'}",
        f"  tensorboard   {s.run_dir / 'tb'}   (tensorboard --logdir {s.run_dir / 'tb'})",
        f"  plots         {s.run_dir / 'plots'}",
        f"  checkpoint    {s.checkpoint if s.checkpoint else 'none written'}",
    ]
    return "\n".join(lines)
