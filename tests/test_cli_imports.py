"""`sparse-train --help`, `config --fields` and config errors answer without importing torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Runs the CLI in a fresh interpreter and reports its exit status and which heavy modules it imported.
PROBE = """
import json, sys
from sparse_train.cli import main
try:
    status = main(sys.argv[1:])
except SystemExit as exit:  # --help: argparse prints and exits
    status = exit.code
heavy = sorted(m for m in ("torch", "numpy", "triton", "ray", "transformers") if m in sys.modules)
print(json.dumps({"status": status, "heavy": heavy}), file=sys.stderr)
"""


@pytest.mark.parametrize(
    "argv, status",
    [
        (["--help"], 0),
        (["config", "--fields"], 0),
        (["config", "--set", "model.d_model=0"], 2),
        (["config", "--set", "nosuch.key=1"], 2),
        (["train", "--config", "/nonexistent.yaml"], 2),
        (["train", "--set", "model.n_heads=3"], 2),
    ],
)
def test_help_config_and_config_errors_import_no_torch(argv, status):
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=60)
    result = json.loads(done.stderr.strip().splitlines()[-1])
    assert result["status"] == status, done.stderr
    assert result["heavy"] == [], f"{argv} imported {result['heavy']}"
    if argv == ["--help"]:
        assert "usage: sparse-train" in done.stdout
