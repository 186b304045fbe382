"""Progress as work goes, on a terminal and off it: plain timestamped lines where stderr is a log
file, CI or a pipe (never one dump at the end), and what --compile is compiling."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from melt_cli import console, progress
from melt_cli.app import app

runner = CliRunner()
STAMP = re.compile(r"^\d\d:\d\d:\d\d ")


def test_quickstart_reports_progress_as_it_goes_off_a_terminal(tmp_path):
    """`melt quickstart` (its smallest settings) with stderr a pipe: timestamped lines, each stage's
    steps and counts arriving while it runs (before the next stage starts), not all at the end."""
    cmd = [sys.executable, "-m", "melt_cli", "quickstart", "--out", str(tmp_path / "qs"), "--no-reasoning"]
    cmd += ["--steps1", "2", "--steps2", "1", "--seq-len", "16", "--batch-tokens", "16", "--eval-sequences", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    arrivals = []
    try:
        for line in iter(proc.stderr.readline, ""):
            arrivals.append((time.monotonic(), line.rstrip("\n")))
    finally:
        proc.wait(timeout=300)
    lines = [line for _, line in arrivals]
    assert proc.returncode == 0, "\n".join(lines)
    assert all(STAMP.match(line) for line in lines if line.strip()), lines

    def when(pattern: str) -> float:
        return next(t for t, line in arrivals if re.search(pattern, line))

    assert when(r" 2/6 phase 1 step 2/2 \| ETA") < when(r" 3/6 phase 2: ")
    assert when(r" 4/6 evaluate \(.*\): 3/3 sequences") < when(r" 5/6 generate ")
    assert when(r" 5/6 generate: 3/3 samples") < when(r" 6/6 KV-cache ")
    steps = [t for t, line in arrivals if re.search(r" step \d+/\d+ \| | \d+/\d+ (sequences|samples) ", line)]
    assert len(steps) >= 4 and steps[-1] - steps[0] > 0.5  # over time, not in one burst


@pytest.fixture
def plain_err(monkeypatch):
    """console.err as a non-terminal writing to a buffer; a clock the test moves."""
    buffer = io.StringIO()
    monkeypatch.setattr(console, "err", Console(file=buffer, width=80, force_terminal=False))
    clock = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    return buffer, clock


def test_plain_step_lines_every_log_every_steps_or_ten_seconds(plain_err):
    buffer, clock = plain_err
    with progress.training_progress(100, "phase 1", log_every=50) as (on_step, on_event):
        on_event("phase 1: student s, teacher t")
        for step in range(1, 101):
            clock[0] += 4.0 if step <= 10 else 0.1  # slow first steps: a line by time, every ~10 s
            on_step({"step": step, "loss": 1.0, "tokens_per_s": 10.0, "grad_norm": 0.5, "peak_memory_bytes": 0})
    lines = buffer.getvalue().splitlines()
    assert all(STAMP.match(line) for line in lines) and "phase 1: student s" in lines[0]
    logged = [int(re.search(r"step (\d+)/100", line).group(1)) for line in lines[1:]]
    assert logged == [3, 6, 9, 50, 100]  # 12 s, 24 s, 36 s; then every 50 steps and the last


def test_plain_counts_by_time_and_at_the_end(plain_err):
    buffer, clock = plain_err
    with progress.byte_progress("evaluating", unit="problems") as update:
        for done in range(1, 31):
            clock[0] += 1.0
            update(done, 30)
    lines = buffer.getvalue().splitlines()
    assert [re.search(r"(\d+)/30 problems", line).group(1) for line in lines] == ["10", "20", "30"]
    assert all(STAMP.match(line) for line in lines) and "ETA 0m00s" in lines[-1]


def test_generate_compile_says_what_it_compiles(tiny_ckpt, monkeypatch):
    """--compile tells when it starts compiling a step and how long that took (a cold compile is
    ~1 min on a CPU); torch.compile is stubbed here: the messages, not the compiler, are tested."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    result = runner.invoke(app, ["generate", str(tiny_ckpt), "--prompt", "The", "--max-new-tokens", "4", "--compile"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if "compil" in line and "decode path:" not in line]
    assert len(lines) == 2 and all(STAMP.match(line) for line in lines), lines
    assert lines[0].endswith("compiling the decode step (batch 1, 256 positions) ...")
    assert re.search(r"compiled the decode step in \d+\.\d s$", lines[1])
