"""Progress on stderr, fed by melt_core's progress callbacks: on a terminal, rich progress bars;
elsewhere (a log file, CI, a pipe), plain timestamped lines as the work goes (every ``log_every``
steps, and at least every ``PLAIN_SECONDS`` while work reports), never one dump at the end."""

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

PLAIN_SECONDS = 10.0  # off a terminal: a progress line at least this often while work reports


def plain(message: str) -> None:
    """One timestamped, unwrapped line on stderr (off a terminal: greppable, in order, as it happens)."""
    console.err.print(f"{time.strftime('%H:%M:%S')} {message}", soft_wrap=True, markup=False, highlight=False)


def note(message: str) -> None:
    """A message about work in progress, on stderr as it happens (timestamped off a terminal)."""
    if console.err.is_terminal:
        console.err.print(message, soft_wrap=True, markup=False, highlight=False)
    else:
        plain(message)


def _eta(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class _Due:
    """Whether a plain line is due: at the last count, every ``every`` counts (None: by time only),
    and ``seconds`` after the previous line."""

    def __init__(self, every: int | None = None, seconds: float = PLAIN_SECONDS) -> None:
        self.every, self.seconds, self.last = every, seconds, time.perf_counter()

    def __call__(self, done: int, total: int | None) -> bool:
        now = time.perf_counter()
        if (
            (total is not None and done >= total)
            or (self.every and done % self.every == 0)
            or (now - self.last >= self.seconds)
        ):
            self.last = now
            return True
        return False


class PlainCount:
    """``update(done, total, phase="")`` off a terminal: a line now and then (``_Due``) with the
    amount done (bytes, or a count of ``unit``), the share and the ETA."""

    def __init__(self, description: str, unit: str | None = None) -> None:
        self.description, self.unit, self.due = description, unit, _Due()
        self.start = time.perf_counter()

    def __call__(self, done: int, total: int, phase: str = "") -> None:
        if not self.due(done, total):
            return
        if self.unit is None:
            amount = f"{console.human_bytes(done)}/{console.human_bytes(total)}"
        else:
            amount = f"{done:,}/{total:,} {self.unit}"
        since = time.perf_counter() - self.start
        eta = _eta(since / done * (total - done)) if done else "?"
        share = f"{done / total:.0%}" if total else "-"
        where = f" ({phase})" if phase else ""
        plain(f"{self.description}{where}: {amount} ({share}) | ETA {eta}")


@contextmanager
def byte_progress(description: str, unit: str | None = None) -> Iterator:
    """Yields ``update(done, total, phase="")`` driving a bar: in bytes, or counting ``unit`` (e.g.
    "sequences"). No transfer speed: reading a memory-mapped file makes it meaningless. Off a
    terminal: plain lines (``PlainCount``)."""
    if not console.err.is_terminal:
        yield PlainCount(description, unit)
        return
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


_NOT_LOSS_PARTS = {"step", "loss", "alpha", "grad_norm", "tokens_per_s", "mfu", "peak_memory_bytes"}
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
    if "mfu" in m:
        parts.append(f"MFU {100 * m['mfu']:.3g}%")
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


class PlainSteps:
    """``on_step(metrics)`` off a terminal: a timestamped line every ``log_every`` steps (None: by
    time only), at the last step and at least every ``PLAIN_SECONDS``, with the ETA and every number
    (``format_step``)."""

    def __init__(self, total_steps: int, description: str, log_every: int | None = None) -> None:
        self.total, self.description, self.due = total_steps, description, _Due(log_every)
        self.start, self.first = time.perf_counter(), None

    def __call__(self, m: dict) -> None:
        self.first = self.first if self.first is not None else m["step"] - 1  # a resumed run starts later
        if not self.due(m["step"], self.total):
            return
        done, since = m["step"] - self.first, time.perf_counter() - self.start
        eta = _eta(since / done * (self.total - m["step"])) if done else "?"
        plain(f"{self.description} step {m['step']}/{self.total} | ETA {eta} | {format_step(m, full=True)}")


@contextmanager
def training_progress(total_steps: int, description: str = "training", log_every: int = 10) -> Iterator[tuple]:
    """Yields ``(on_step, on_event)`` for ``melt_core.training.trainer.train``. On a terminal: a bar
    with step, ETA and the loss, events printed above it. Elsewhere (a log file, CI, a pipe):
    timestamped plain lines (``PlainSteps``: every ``log_every`` steps, at the last, and at least
    every ``PLAIN_SECONDS``), events too."""
    if not console.err.is_terminal:
        yield PlainSteps(total_steps, description, log_every), plain
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


class StageProgress:
    """The stages of a pipeline (``melt quickstart``), each announced as it starts and then followed as
    it goes: training steps (``step``) or a count of sequences, problems or samples (``count``). On a
    terminal: the stage line above a bar per stage; elsewhere: timestamped plain lines (``PlainSteps``,
    ``PlainCount``: at least every ``PLAIN_SECONDS``), nothing held back to the end."""

    def __init__(self, bar: Progress | None = None) -> None:
        self.bar, self.task, self.label = bar, None, ""
        self.steps: PlainSteps | None = None
        self.counts: PlainCount | None = None

    def stage(self, message: str, steps: int | None = None) -> None:
        self.label = message.split(":")[0].split(" (")[0]  # "2/7 phase 1", "5/7 generate"
        self.task, self.steps, self.counts = None, None, None
        if self.bar is None:
            plain(message)
            self.steps = PlainSteps(steps, self.label) if steps is not None else None
            return
        self.bar.console.print(f"[bold cyan]{message}[/]")
        if steps is not None:
            self.task = self.bar.add_task(self.label, total=steps, stats="")

    def step(self, m: dict) -> None:
        if self.bar is None:
            if self.steps is not None:
                self.steps(m)
        elif self.task is not None:
            self.bar.update(self.task, completed=m["step"], stats=format_step(m))

    def count(self, done: int, total: int, unit: str, phase: str = "") -> None:
        if self.bar is None:
            self.counts = self.counts or PlainCount(self.label, unit)
            self.counts(done, total, phase)
            return
        if self.task is None:
            self.task = self.bar.add_task(self.label, total=total, stats="")
        self.bar.update(self.task, completed=done, total=total, stats=f"{unit}: {phase}" if phase else unit)

    def event(self, message: str) -> None:
        if self.bar is None:
            plain(message)
        else:
            self.bar.console.print(message)


@contextmanager
def stage_progress() -> Iterator[StageProgress]:
    """A ``StageProgress`` on stderr: a live rich display on a terminal, plain lines elsewhere."""
    if not console.err.is_terminal:
        yield StageProgress()
        return
    with Progress(*STEP_COLUMNS, console=console.err) as bar:
        yield StageProgress(bar)
