"""A rich progress bar on stderr, fed by melt_core's progress callbacks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from . import console


@contextmanager
def byte_progress(description: str) -> Iterator:
    """Yields ``update(done_bytes, total_bytes, phase="")`` driving a bytes-weighted bar."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
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
STEP_COLUMNS = (
    TextColumn("[bold]{task.description}"),
    BarColumn(),
    TextColumn("{task.completed}/{task.total}"),
    TimeRemainingColumn(),
    TextColumn("{task.fields[stats]}"),
)


def format_step(m: dict) -> str:
    """One training step's numbers: loss and its parts, alpha, learning rates, tokens/s, peak memory."""
    parts = [f"loss {m['loss']:.4f}"]
    parts += [
        f"{k} {v:.3f}"
        for k, v in m.items()
        if k not in _NOT_LOSS_PARTS and not k.startswith("lr_") and isinstance(v, float)
    ]
    if "alpha" in m:
        parts.append(f"α {m['alpha']:.2f}")
    parts += [f"{k} {v:.1e}" for k, v in m.items() if k.startswith("lr_")]
    parts.append(f"{m['tokens_per_s']:,.0f} tok/s")
    parts.append(f"peak {console.human_bytes(m['peak_memory_bytes'])}")
    return " | ".join(parts)


@contextmanager
def training_progress(total_steps: int, description: str = "training") -> Iterator[tuple]:
    """Yields ``(on_step, on_event)`` for ``melt_core.training.trainer.train``: a bar with the step's numbers
    (``format_step``); events are printed above it."""
    bar = Progress(*STEP_COLUMNS, console=console.err)
    task = None

    def started() -> Progress:  # on the first report, so that an early error prints no empty bar
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task(description, total=total_steps, stats="")
        return bar

    def on_step(m: dict) -> None:
        started().update(task, completed=m["step"], stats=format_step(m))

    def on_event(message: str) -> None:
        started().console.print(message)

    try:
        yield on_step, on_event
    finally:
        bar.stop()
