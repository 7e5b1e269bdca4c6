"""The planner's predictions against the trainer itself: for layouts of two models at 4 ranks,
the prediction (scaled from the reduced-depth probes) and the dry run of that very layout (full
depth, its pipeline, accumulation and recomputation) agree: peak memory within 15%, the step's
FLOPs and the bytes of every collective kind exactly (balanced routing). The full table, with
more layouts: `sparse-train bench plan` (docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent(
    """
    import json, sys
    from sparse_train.config import load_config
    from sparse_train.plan.hardware import gpu_spec
    from sparse_train.plan.layouts import Layout
    from sparse_train.plan.validate import MODELS, compare

    model, layouts = json.loads(sys.argv[1])
    cfg = load_config(*MODELS[model])
    probes = {}
    print(json.dumps([compare(cfg, Layout(*layout), gpu_spec("h100"), 8, probes) for layout in layouts]))
    """
)
CASES = {  # a few of plan.validate.LAYOUTS per model (the rest: `sparse-train bench plan`)
    "tiny-moe": [(1, 4, 2, 1, 1, 1, 1, "none"), (1, 2, 2, 1, 2, 1, 2, "none"), (2, 2, 2, 1, 1, 1, 1, "all"),
                 (1, 4, 2, 1, 1, 1, 2, "none", "micro_batch"), (1, 4, 2, 1, 1, 1, 2, "all")],
    "tiny-deepseek-v3": [(1, 2, 2, 2, 1, 1, 1, "sparse")],
}  # fmt: skip


def _compare(case: str) -> list[dict]:
    from sparse_train.dryrun.fake_cuda import preload_environment

    child = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps([case, CASES[case]])],
        env=preload_environment(8),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    return json.loads(child.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # ~20 s per model: probes and dry runs in a fake-CUDA child
@pytest.mark.parametrize("case", list(CASES))
def test_predicted_memory_flops_and_collectives_match_the_layouts_own_dry_run(case):
    for row in _compare(case):
        assert abs(row["memory_error"]) <= 0.15, row
        assert row["predicted_flops"] == row["measured_flops"], row
        assert row["predicted_collective_bytes"] == row["measured_collective_bytes"], row
