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
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())
    bar = Progress(*columns, console=console.err, transient=False)
    task = None

    def update(done: int, total: int, phase: str = "") -> None:
        nonlocal task
        if task is None:  # started on the first report, so early errors print no empty bar
            bar.start()
            task = bar.add_task(description, total=total)
        bar.update(task, completed=done, total=total,
                   description=f"{description} ({phase})" if phase else description)

    try:
        yield update
    finally:
        bar.stop()
