"""Output directories that are never half-written: refuse a non-empty one unless forced, write
into a temporary sibling, rename into place on success."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputExistsError


def _refuse_non_empty(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise OutputExistsError(f"{out} exists and is not empty; pass --force to replace it")


def fresh_output_dir(out: str | os.PathLike, force: bool = False) -> Path:
    """Create ``out``; a non-empty existing ``out`` is refused unless ``force`` (then emptied)."""
    out = Path(out)
    _refuse_non_empty(out, force)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


@contextmanager
def atomic_directory(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to write into; it replaces ``out`` only on success.

    An existing non-empty ``out`` is refused unless ``force``. On any error (Ctrl-C included) the
    temporary directory is removed and ``out`` is left as it was.
    """
    out = Path(out)
    _refuse_non_empty(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
