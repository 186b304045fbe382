"""Runs that cannot be hijacked, overwritten or lost: resume reads no pickle, survives a torn
checkpoint or metrics file, refuses other data and another --out, holds a lock, and a SIGTERM or
Ctrl-C saves a resumable checkpoint (exit 143 / 130)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
from cli_helpers import one_red_line
from typer.testing import CliRunner

from melt_cli.app import app
from melt_core.training.run_lock import LOCK_NAME, run_lock

runner = CliRunner()
PRETRAIN = ["pretrain", "--preset", "tiny", "--loops", "2", "--vocab-size", "300", "--seq-len", "32"]
PRETRAIN += ["--micro-batch", "2", "--eval-every", "0"]


def _pretrain(text_file, *args):
    return runner.invoke(app, [*PRETRAIN, "--data", str(text_file), *args])


def _error_line(result) -> str:
    """Exit 1 and one `error:` line (after any progress lines the run printed), no traceback."""
    assert result.exit_code == 1, result.output
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return " ".join(result.stderr[result.stderr.index("error:") :].split())


def _said(result, text: str) -> bool:
    """Whether stderr holds ``text``, however the console wrapped its lines."""
    return "".join(text.split()) in "".join(result.stderr.split())


def _steps(run) -> list[int]:
    return [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]


class _Payload:
    """A pickle that writes a marker file when it is loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


@pytest.fixture
def run(text_file, tmp_path):
    """A pretraining run of 2 steps with a checkpoint after each."""
    out = tmp_path / "run"
    result = _pretrain(text_file, "--out", str(out), "--steps", "2", "--save-every", "1", "--keep-last", "0")
    assert result.exit_code == 0, result.output
    return out


def test_checkpoints_hold_no_pickle(run):
    for ckpt in (run / "checkpoints").iterdir():
        for f in ckpt.iterdir():
            assert f.suffix in (".safetensors", ".json"), f
            assert not f.read_bytes().startswith(b"\x80"), f"{f} is a pickle"


def test_resume_never_unpickles_what_a_run_holds(run, text_file, tmp_path):
    """Pickles planted under every name accelerate or torch would load, and in place of melt's own
    files: nothing executes; the torn newest checkpoint is skipped with a note."""
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker))
    newest = run / "checkpoints" / "step-000002"
    for name in ["custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl", "optimizer.bin"]:
        (newest / name).write_bytes(payload)
    for name in ["scheduler.bin", "pytorch_model.bin", "model.safetensors", "optimizer.safetensors"]:
        (newest / name).write_bytes(payload)
    result = _pretrain(text_file, "--resume", str(run), "--steps", "3")
    assert result.exit_code == 0, result.output
    assert not marker.exists()
    assert _said(result, "skipped step-000002") and _said(result, "at step 1")
    assert _steps(run) == [1, 2, 3]

    for f in (run / "checkpoints").rglob("*"):
        if f.is_file() and f.name != "run_state.json":
            f.write_bytes(payload)
    line = _error_line(_pretrain(text_file, "--resume", str(run), "--steps", "4"))
    assert "no intact checkpoint" in line
    assert not marker.exists()


def test_truncated_weights_fall_back_to_the_newest_intact_checkpoint(run, text_file):
    weights = run / "checkpoints" / "step-000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = _pretrain(text_file, "--resume", str(run), "--steps", "3")
    assert result.exit_code == 0, result.output
    assert _said(result, "skipped step-000002") and _said(result, "truncated or corrupt")
    assert _steps(run) == [1, 2, 3]


def test_torn_metrics_line_is_dropped_with_a_note(run, text_file):
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    result = _pretrain(text_file, "--resume", str(run), "--steps", "3")
    assert result.exit_code == 0, result.output
    assert _said(result, "dropped 1 unreadable line")
    assert _steps(run) == [1, 2, 3]


@pytest.mark.parametrize("name", ["run_config.json", "run_state.json"])
def test_corrupt_state_files_are_one_line_naming_the_file(run, text_file, name):
    for f in [run / name] if name == "run_config.json" else list((run / "checkpoints").glob(f"*/{name}")):
        f.write_text('{"step": 2, "ar')
    line = one_red_line(_pretrain(text_file, "--resume", str(run), "--steps", "3"))
    assert name in line and "corrupt" in line


def test_resume_refuses_changed_data(run, text_file, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"text": "a short and different document " * 20}) + "\n")
    line = _error_line(runner.invoke(app, [*PRETRAIN, "--data", str(other), "--resume", str(run), "--steps", "3"]))
    assert "not the data" in line and "--data" in line


def _digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_resume_does_not_write_into_another_out(melt_ckpt, tiny_ckpt, text_file, tmp_path):
    """`--resume RUN --out TEACHER` once wrote the student over the teacher."""
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_ckpt, teacher)
    run = tmp_path / "p1"
    train = ["transition", str(melt_ckpt), "--teacher", str(teacher), "--data", str(text_file), "--seq-len", "32"]
    assert runner.invoke(app, [*train, "--out", str(run), "--steps", "1"]).exit_code == 0
    before = _digest(teacher)
    line = one_red_line(runner.invoke(app, [*train, "--resume", str(run), "--out", str(teacher), "--steps", "2"]))
    assert "names another folder" in line
    assert _digest(teacher) == before


def test_a_locked_run_is_refused_and_a_stale_lock_taken_over(run, text_file):
    before = _digest(run)
    with run_lock(run):
        line = one_red_line(_pretrain(text_file, "--out", str(run), "--force", "--steps", "1"))
        assert f"in use by another melt run (PID {os.getpid()})" in line
        assert "in use" in one_red_line(_pretrain(text_file, "--resume", str(run), "--steps", "3"))
    assert _digest(run) == before  # --force deleted nothing
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / LOCK_NAME).write_text(f"{dead.pid}\n")
    result = _pretrain(text_file, "--resume", str(run), "--steps", "3")
    assert result.exit_code == 0, result.output
    assert _said(result, f"left by PID {dead.pid}")
    assert not (run / LOCK_NAME).exists()


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--lr", "nan", "--lr must be a finite number >= 0"),
        ("--lr", "inf", "--lr must be a finite number >= 0"),
        ("--lr", "-0.1", "--lr must be a finite number >= 0"),
        ("--seed", str(2**40), "--seed must be in 0..4294967295"),
    ],
)
def test_bad_optimisation_values_are_refused_before_any_step(text_file, tmp_path, flag, value, message):
    line = one_red_line(_pretrain(text_file, "--out", str(tmp_path / "o"), "--steps", "1", flag, value))
    assert message in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_a_resumable_checkpoint(text_file, tmp_path, signum, status):
    """What a scheduler's SIGTERM (or Ctrl-C) does to a long run: one line, a checkpoint, exit 143 (130)."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "melt_cli", *PRETRAIN, "--data", str(text_file), "--out", str(run)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "MELT_THREADS": "1"}
    proc = subprocess.Popen([*cmd, "--steps", "100000"], stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not ((run / "metrics.jsonl").is_file() and len(_steps(run)) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.2)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == status, stderr
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "continue with --resume" in errors[0] and "Traceback" not in stderr
    done = len(_steps(run))
    assert (run / "checkpoints" / f"step-{done:06d}" / "run_state.json").is_file()
    resumed = _pretrain(text_file, "--resume", str(run), "--steps", str(done + 1))
    assert resumed.exit_code == 0, resumed.output
    assert _steps(run) == list(range(1, done + 2))


@pytest.mark.parametrize("step", [-1, "2", True, 7])
def test_a_step_that_does_not_fit_its_checkpoint_is_skipped(run, text_file, step):
    """A run_state.json whose step is not the checkpoint's own (negative, a string, another number)."""
    file = run / "checkpoints" / "step-000002" / "run_state.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "step": step}))
    result = _pretrain(text_file, "--resume", str(run), "--steps", "3")
    assert result.exit_code == 0, result.output
    assert _said(result, "skipped step-000002") and _said(result, "at step 1")
    assert _steps(run) == [1, 2, 3]
