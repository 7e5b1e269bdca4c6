"""scripts/gpu-check.sh on a machine without a GPU: a one-line refusal with exit status 2, and
(slow suite) its CPU rehearsal, which runs every command and check of the script on gloo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu-check.sh"
BASH = shutil.which("bash") or "/bin/bash"


def _run(env: dict[str, str], tmp_path: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "OUT": str(tmp_path / "out")}
    return subprocess.run(
        [BASH, str(SCRIPT)], env={**base, **env}, capture_output=True, text=True, timeout=timeout, cwd=tmp_path
    )


def _path_without(tool: str, tmp_path: Path) -> str:
    """PATH with every directory holding `tool` replaced by a copy of it without that tool."""
    parts = []
    for i, entry in enumerate(os.environ["PATH"].split(os.pathsep)):
        if entry and (Path(entry) / tool).exists():
            copy = tmp_path / f"path{i}"
            copy.mkdir()
            for item in Path(entry).iterdir():
                if item.name != tool:
                    (copy / item.name).symlink_to(item)
            entry = str(copy)
        parts.append(entry)
    return os.pathsep.join(parts)


def test_script_parses():
    assert subprocess.run([BASH, "-n", str(SCRIPT)], capture_output=True).returncode == 0


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_script_passes_shellcheck():
    done = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_without_nvidia_smi_it_refuses_in_one_line(tmp_path):
    done = _run({"PATH": _path_without("nvidia-smi", tmp_path)}, tmp_path)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == "gpu-check: no nvidia-smi on this machine: it checks NVIDIA GPUs, and there are none here\n"
    assert not (tmp_path / "out").exists(), "a refusal leaves nothing behind"


@pytest.mark.slow  # imports torch in the script's subprocess: seconds
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where torch sees no CUDA device")
def test_with_nvidia_smi_but_no_cuda_torch_it_refuses_in_one_line(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: pretend'\n")
    (fake / "nvidia-smi").chmod(0o755)
    venv_python = str(ROOT / ".venv" / "bin" / "python")
    done = _run({"PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "PY": venv_python}, tmp_path)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "torch does not (a CPU build of torch?)" in done.stderr


def test_an_unknown_rehearsal_is_refused(tmp_path):
    done = _run({"GPU_CHECK_REHEARSAL": "tpu"}, tmp_path)
    assert (done.returncode, done.stderr) == (2, "gpu-check: GPU_CHECK_REHEARSAL must be 'cpu' or unset, got 'tpu'\n")


@pytest.mark.slow
def test_cpu_rehearsal_runs_every_step_and_passes(tmp_path):
    """Every command of the script, with its flags, and every check, on CPU (gloo for the
    2-process runs): what the script can be tested for without a GPU."""
    env = {
        "GPU_CHECK_REHEARSAL": "cpu",
        "BUDGET_S": "1500",
        "PY": str(ROOT / ".venv" / "bin" / "python"),
        "ST": str(ROOT / ".venv" / "bin" / "sparse-train"),
    }
    done = subprocess.run(
        [BASH, str(SCRIPT)],
        env={**os.environ, **env, "OUT": str(tmp_path / "out")},
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    summary = done.stdout[done.stdout.index("gpu-check summary") :]
    for step in ("gpu-tests", "bench-bf16", "bench-fp32", "train-bf16", "train-grouped_mm", "ep2", "tp2"):
        assert f"  {step}" in summary and "PASS" in summary.split(f"  {step}")[1].split("\n")[0], summary
    assert "REHEARSAL on CPU" in done.stdout
    bench = [json.loads(line) for line in (tmp_path / "out" / "bench-moe-layer-bf16.jsonl").read_text().splitlines()]
    assert bench and bench[0]["ours_grouped_mm_ms"] > 0
