"""One process at a time in a run directory: an exclusive lock held for the whole run.

Two runs writing one folder mix their metrics and checkpoints. The lock is ``flock`` on a file in
the run directory that also records the holder's PID (for the message): the kernel releases it when
its process dies however it dies, so a lock left by a killed run never blocks the next one, which
takes the file over with a note.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import MeltError
from ..outputs import pid_alive

LOCK_NAME = ".melt-run.lock"


class RunInUseError(MeltError):
    """Another live process holds the run directory."""


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 64).decode(errors="replace").strip()


def _lock(fd: int, run: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd) or "unknown"
        raise RunInUseError(
            f"{run} is in use by another melt run (PID {holder}); wait for it to end, or stop it first"
        ) from None


def check_unlocked(run: Path) -> None:
    """Refuse a run directory another live process holds (cheap: before anything is loaded)."""
    if (run / LOCK_NAME).is_file():
        fd = os.open(run / LOCK_NAME, os.O_RDONLY)
        try:
            _lock(fd, run)  # released by close
        finally:
            os.close(fd)


@contextmanager
def run_lock(run: Path, on_note: Callable[[str], None] = lambda note: None) -> Iterator[Path]:
    """Hold ``run``'s lock (creating ``run``) while the block runs; refuse if another process holds it."""
    run.mkdir(parents=True, exist_ok=True)
    file = run / LOCK_NAME
    fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _lock(fd, run)
        previous = _holder(fd)
        if previous.isdigit() and int(previous) != os.getpid() and not pid_alive(int(previous)):
            on_note(f"took over the lock of {run} left by PID {previous}, which is no longer running")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield file
        finally:
            file.unlink(missing_ok=True)
    finally:
        os.close(fd)
