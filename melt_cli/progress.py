"""A rich progress bar on stderr, fed by melt_core's progress callbacks."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)

from . import console


@contextmanager
def byte_progress(description: str, unit: str | None = None) -> Iterator:
    """Yields ``update(done, total, phase="")`` driving a bar: in bytes, or counting ``unit`` (e.g.
    "sequences"). No transfer speed: reading a memory-mapped file makes it meaningless."""
    amount = DownloadColumn() if unit is None else TextColumn(f"{{task.completed:,}}/{{task.total:,}} {unit}")
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(), amount, TimeRemainingColumn())
    bar = Progress(*columns, console=console.err, transient=False)
    task = None

    def update(done: int, total: int, phase: str = "") -> None:
        nonlocal task
        if task is None:  # started on the first report, so early errors print no empty bar
            bar.start()
            task = bar.add_task(description, total=total)
        bar.update(task, completed=done, total=total, description=f"{description} ({phase})" if phase else description)

    try:
        yield update
    finally:
        bar.stop()


_NOT_LOSS_PARTS = {"step", "loss", "alpha", "grad_norm", "tokens_per_s", "peak_memory_bytes"}
# description, a short bar, step/total, ETA and the loss fit 80 columns; the rest of the numbers
# follow where the terminal is wider (all of them are in metrics.jsonl).
STEP_COLUMNS = (
    TextColumn("[bold]{task.description}"),
    BarColumn(bar_width=16),
    TextColumn("{task.completed}/{task.total}"),
    TimeRemainingColumn(compact=True),
    TextColumn("{task.fields[stats]}"),
)


def format_step(m: dict, full: bool = False) -> str:
    """One training step's numbers: loss, tokens/s, and (``full``) the loss parts, alpha, learning
    rates and peak memory."""
    parts = [f"loss {m['loss']:.4f}", f"{m['tokens_per_s']:,.0f} tok/s"]
    if full:
        parts += [
            f"{k} {v:.3f}"
            for k, v in m.items()
            if k not in _NOT_LOSS_PARTS and not k.startswith("lr_") and isinstance(v, float)
        ]
        if "alpha" in m:
            parts.append(f"α {m['alpha']:.2f}")
        parts += [f"{k} {v:.1e}" for k, v in m.items() if k.startswith("lr_")]
        parts.append(f"grad norm {m['grad_norm']:.3g}")
        parts.append(f"peak {console.human_bytes(m['peak_memory_bytes'])}")
    return " | ".join(parts)


def _eta(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


@contextmanager
def training_progress(total_steps: int, description: str = "training", log_every: int = 10) -> Iterator[tuple]:
    """Yields ``(on_step, on_event)`` for ``melt_core.training.trainer.train``. On a terminal: a bar
    with step, ETA and the loss, events printed above it. Elsewhere (a log file, CI): one plain line
    every ``log_every`` steps and at the last, with ETA and every number (``format_step``)."""
    if not console.err.is_terminal:
        start, first = time.perf_counter(), None

        def on_plain_step(m: dict) -> None:
            nonlocal first
            first = first if first is not None else (m["step"] - 1, time.perf_counter())
            if m["step"] % log_every and m["step"] != total_steps:
                return
            done, since = m["step"] - first[0], time.perf_counter() - start
            eta = _eta(since / done * (total_steps - m["step"])) if done else "?"
            line = f"{description} step {m['step']}/{total_steps} | ETA {eta} | {format_step(m, full=True)}"
            console.err.print(line, soft_wrap=True, markup=False)

        yield on_plain_step, lambda message: console.err.print(message, soft_wrap=True, markup=False)
        return

    bar = Progress(*STEP_COLUMNS, console=console.err)
    task = None

    def started() -> Progress:  # on the first report, so that an early error prints no empty bar
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task(description, total=total_steps, stats="")
        return bar

    def on_step(m: dict) -> None:
        started().update(task, completed=m["step"], stats=format_step(m, full=console.err.width > 120))

    def on_event(message: str) -> None:
        started().console.print(message)

    try:
        yield on_step, on_event
    finally:
        bar.stop()
