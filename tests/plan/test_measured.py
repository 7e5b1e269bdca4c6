"""The planner against a real run: the predicted peak memory of a layout's ranks and what the
same run uses training on local gloo processes (bench memory's measurement), within 15%. The
full table, two models and eleven layouts: `sparse-train bench plan --gloo` (docs/benchmarks.md).
And the predicted bytes of each collective kind in a step and each rank's in a real run with
balanced routing, equal; the table: `sparse-train bench plan --collectives`."""

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
    from sparse_train.plan.measured import MODELS, compare_with_gloo

    if __name__ == "__main__":  # the ranks are spawned: they import this module again
        cfg = load_config(*MODELS["moe-d256"])
        print(json.dumps(compare_with_gloo(cfg, Layout(*json.loads(sys.argv[1])), gpu_spec("h100"), 8)))
    """
)


@pytest.mark.slow  # ~30 s: two probes on fake CUDA, then two steps on four gloo processes
def test_predicted_peak_memory_is_within_15_percent_of_a_real_run_with_every_block_recomputed(tmp_path):
    from sparse_train.dryrun.fake_cuda import preload_environment

    script = tmp_path / "child.py"
    script.write_text(CHILD)
    layout = [2, 2, 2, 1, 1, 2, 1, "all"]  # HSDP, expert parallel, every block recomputed
    child = subprocess.run(
        [sys.executable, str(script), json.dumps(layout)],
        env=preload_environment(8), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr[-3000:]
    row = json.loads(child.stdout.strip().splitlines()[-1])
    assert len(row["measured_mb_per_rank"]) == 4 and min(row["measured_mb_per_rank"]) > 30, row
    assert abs(row["memory_error"]) <= 0.15, row


DISPATCH_CHILD = textwrap.dedent(
    """
    import json, sys
    from sparse_train.config import load_config
    from sparse_train.plan.hardware import gpu_spec
    from sparse_train.plan.layouts import Layout
    from sparse_train.plan.measured import compare_collectives
    from sparse_train.plan.validate import MODELS

    if __name__ == "__main__":
        cfg = load_config(*MODELS["tiny-moe"])
        print(json.dumps(compare_collectives(cfg, Layout(*json.loads(sys.argv[1])), gpu_spec("h100"), 8)))
    """
)


@pytest.mark.slow  # ~40 s: two probes on fake CUDA, then two steps on four gloo processes
def test_predicted_bytes_of_every_collective_kind_equal_a_real_run_with_balanced_routing(tmp_path):
    from sparse_train.dryrun.fake_cuda import preload_environment

    script = tmp_path / "child.py"
    script.write_text(DISPATCH_CHILD)
    # HSDP, two micro-batches, every block recomputed: the recomputed forward dispatches again
    layout = [2, 2, 2, 1, 1, 1, 2, "all"]
    child = subprocess.run(
        [sys.executable, str(script), json.dumps(layout)],
        env=preload_environment(8), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr[-3000:]
    row = json.loads(child.stdout.strip().splitlines()[-1])
    predicted = row["predicted_collective_bytes"]
    assert {"all_to_all", "all_gather", "reduce_scatter", "all_reduce"} <= set(predicted), row
    assert row["measured_collective_bytes_per_rank"] == [predicted] * 4, row
