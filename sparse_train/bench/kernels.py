"""`sparse-train bench kernels --aot`: every Triton kernel compiled for GPU targets, with resources.

One JSON object per kernel x configuration x dtype x target (sparse_train/kernels/aot.py does the
compiling): shared memory and the target's per-block limit, warps, stages, registers and spills
where the compiler reports them (null where not), `selectable` (false: the launcher's autotuner
prunes this configuration on this target, as spilling; it is compiled and reported all the same),
and `problems`, empty when the configuration fits its target. Without --json a summary per kernel
and target follows on stderr.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from sparse_train.kernels import aot

SUMMARY_COLUMNS = (
    "kernel",
    "target",
    "configs",
    "max shared",
    "limit",
    "max registers",
    "spilling configs",
    "pruned",
    "problems",
)


def run(targets: list[str], dtypes: list[str], *, quick: bool, jobs: int | None, as_json: bool) -> list[dict[str, Any]]:
    """Compile the matrix (or, quick, each kernel's largest configuration per target in bf16) and
    print it; returns the rows."""
    from tqdm import tqdm

    selected = aot.representative_cases(targets) if quick else aot.cases(targets, dtypes)
    with tqdm(total=len(selected), desc="aot compile", unit="kernel", file=sys.stderr) as bar:
        rows = aot.compile_all(selected, jobs=jobs, progress=lambda _row: bar.update())
    for row in rows:
        print(json.dumps(row | {"problems": aot.problems(row)}), flush=True)
    if not as_json:
        print(summary_table(rows), file=sys.stderr)
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per kernel and target: the largest shared memory and register count over its
    configurations and dtypes, the configurations that spill, those the autotuner prunes there,
    and the count with any problem."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["kernel"], row["target"]), []).append(row)
    kernels = list(dict.fromkeys(row["kernel"] for row in rows))  # kernel by kernel, targets in order
    order = sorted(groups, key=lambda k: (kernels.index(k[0]), list(aot.TARGETS_BY_NAME).index(k[1])))
    return [_summary(kernel, target, groups[(kernel, target)]) for kernel, target in order]


def _summary(kernel: str, target: str, group: list[dict[str, Any]]) -> dict[str, Any]:
    compiled = [r for r in group if r["ok"]]
    registers = [r["registers"] for r in compiled if r.get("registers") is not None]
    spilling = [r for r in compiled if r.get("spill_stores") or r.get("spill_loads")]
    return {
        "kernel": kernel,
        "target": f"{target} ({group[0]['gpu']})",
        "configs": len(group),
        "max shared": _kib(max((r["shared"] for r in compiled), default=None)),
        "limit": _kib(group[0]["shared_limit"]),
        "max registers": max(registers, default=None),
        "spilling configs": f"{len(spilling)} (max {max(_spill(r) for r in spilling)} B)" if spilling else "0",
        "pruned": sum(1 for r in group if not r.get("selectable", True)),
        "problems": sum(1 for r in group if aot.problems(r)),
    }


def _kib(size: int | None) -> str | None:
    return None if size is None else f"{size / 1024:.1f} KiB"


def _spill(row: dict[str, Any]) -> int:
    return max(row.get("spill_stores") or 0, row.get("spill_loads") or 0)


def summary_table(rows: list[dict[str, Any]]) -> str:
    """The summary as a Markdown table (docs/gpu.md holds one)."""
    lines = ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + " --- |" * len(SUMMARY_COLUMNS)]
    for entry in summarize(rows):
        lines.append("| " + " | ".join("—" if entry[c] is None else str(entry[c]) for c in SUMMARY_COLUMNS) + " |")
    return "\n".join(lines)
