from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sparse_train.cli import main
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


def _set_args(*extra: str) -> list[str]:
    return [arg for o in tiny_overrides(*extra) for arg in ("--set", o)]


def test_train_eval_generate_through_the_cli(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), *_set_args("train.steps=12")]) == 0
    out = capsys.readouterr().out
    for needle in ("loss", "tokens/s", "expert load", "metrics.jsonl", "tensorboard", "step_00000012"):
        assert needle in out, needle

    assert main(["eval", "--checkpoint", str(run)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 12 and result["val_loss"] > 0 and result["checkpoint"].endswith("step_00000012")

    assert main(["generate", "--checkpoint", str(run), "--prompt", "def ", "--max-new-tokens", "20", "--greedy"]) == 0
    greedy = capsys.readouterr().out
    assert greedy.startswith("def ")
    assert main(["generate", "--checkpoint", str(run), "--prompt", "def ", "--max-new-tokens", "20", "--greedy"]) == 0
    assert capsys.readouterr().out == greedy  # greedy is deterministic
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(run),
                "--prompt",
                "import",
                "--max-new-tokens",
                "20",
                "--top-p",
                "0.9",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("import")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["eval", "--checkpoint", "/no/such/run"], "no checkpoint here"),
        (["generate", "--checkpoint", "/no/such/run", "--prompt", "x", "--top-p", "0"], "--top-p must be in (0, 1]"),
        (["train", "--resume", "auto"], "--resume auto needs --run-dir"),
        (["train", "--bogus"], "unrecognized arguments: --bogus"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, expected, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1


def test_corrupted_explicit_checkpoint_is_a_clear_error(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), *_set_args("train.steps=10")]) == 0
    ckpt = run / "checkpoints" / "step_00000010"
    shard = next((ckpt / "optim").glob("*.distcp"))
    shard.write_bytes(b"")
    capsys.readouterr()
    assert main(["train", "--run-dir", str(tmp_path / "other"), "--resume", str(ckpt), *_set_args()]) == 2
    assert f"optim/{shard.name} is truncated" in capsys.readouterr().err


def test_python_dash_m_is_the_same_command():
    proc = subprocess.run([sys.executable, "-m", "sparse_train", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "train" in proc.stdout and "generate" in proc.stdout


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_auto_matches_an_uninterrupted_run(tmp_path):
    """A real process killed with SIGKILL resumes from its newest complete checkpoint, exactly."""
    args = _set_args("train.steps=60", "checkpoint.every=5", "checkpoint.keep=2", "model.d_model=64")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref, run = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(
        [sys.executable, "-m", "sparse_train", "train", "--run-dir", str(ref), *args],
        check=True,
        env=env,
        capture_output=True,
        timeout=600,
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "sparse_train", "train", "--run-dir", str(run), *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step_00000015").exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run(
        [sys.executable, "-m", "sparse_train", "train", "--run-dir", str(run), "--resume", "auto", *args],
        check=True,
        env=env,
        capture_output=True,
        timeout=600,
    )

    def losses(d):
        return {
            r["step"]: r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in r
        }

    assert losses(run) == losses(ref)


@pytest.mark.slow
def test_main_job_trains_tiny_moe_with_a_falling_loss(tmp_path):
    """What `make run` does: the shipped recipe on the default corpus, end to end."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sparse_train",
            "train",
            "--config",
            str(ROOT / "configs" / "tiny-moe.yaml"),
            "--run-dir",
            str(tmp_path),
            "--set",
            "logging.progress=false",
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["lm_loss"] for r in records if "lm_loss" in r]
    assert losses[-1] < losses[0] - 2.0
    assert [r["val_loss"] for r in records if "val_loss" in r][-1] < 2.5
    assert "expert load" in proc.stdout


def test_plot_runs_draws_every_run_on_one_step_axis(tmp_path, capsys):
    for name, records in {
        "a": [{"step": s, "lm_loss": 3.0 - s / 100} for s in range(10, 101, 10)] + [{"step": 100, "val_loss": 2.0}],
        "b": [{"step": 0, "val_loss": 2.0}] + [{"step": s, "lm_loss": 2.0 - s / 200} for s in range(10, 101, 10)],
    }.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "plots" / "curves"
    assert main(["plot-runs", f"first={tmp_path / 'a'}", f"continued={tmp_path / 'b'}@100", "--out", str(out)]) == 0
    assert out.with_suffix(".png").stat().st_size > 10_000 and out.with_suffix(".svg").is_file()
    from sparse_train.train.plots import compare_runs

    fig = compare_runs(
        [("b", [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()], 100)]
    )
    xs = [x for line in fig.axes[0].get_lines() for x in line.get_xdata()]
    assert min(xs) == 100 and max(xs) == 200, "the continued run is drawn from its offset"
    capsys.readouterr()
    for argv, message in [
        (["nolabel"], "is not LABEL=RUN_DIR"),
        ([f"x={tmp_path}"], "metrics.jsonl does not exist"),
        ([f"x={tmp_path / 'a'}@soon"], "is not a step count"),
    ]:
        assert main(["plot-runs", *argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
