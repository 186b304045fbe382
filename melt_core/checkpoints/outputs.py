"""Output directories that are never half-written and never swallow the command's inputs.

A non-empty output is refused unless forced; a forced output is refused all the same when it is,
or contains, one of the command's inputs (``keep``). Writing goes to a temporary sibling that is
renamed into place on success; temporary siblings left by a killed run are removed.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ..errors import InvalidArgumentError, OutputExistsError, OutputNotWritableError

PathLike = str | os.PathLike


def _is_non_empty(out: Path) -> bool:
    return out.exists() and (not out.is_dir() or any(out.iterdir()))


def check_output(
    out: PathLike, force: bool, keep: Sequence[PathLike | None] = (), hint: str = "pass --force to replace it"
) -> None:
    """Refuse an ``out`` that cannot be created, a non-empty one unless ``force``, and a forced one
    that is or contains an input. Cheap: run it before any work."""
    out = Path(out)
    existing = next(p for p in [out, *out.parents] if p.exists())
    if existing != out and not existing.is_dir():
        raise OutputNotWritableError(f"cannot write {out}: {existing} is not a folder")
    if not os.access(existing if existing.is_dir() else existing.parent, os.W_OK):
        raise OutputNotWritableError(f"cannot write {out}: {existing} is not writable")
    if not _is_non_empty(out):
        return
    if not force:
        raise OutputExistsError(f"{out} exists and is not empty; {hint}")
    target = out.resolve()
    for item in keep:
        if item is None or not Path(item).exists():
            continue
        path = Path(item).resolve()
        if path == target or target in path.parents:
            raise InvalidArgumentError(
                f"--force would delete {item}, an input of this command, with {out}; choose another output"
            )


def _make_dir(path: Path, out: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputNotWritableError(f"cannot write {out}: {e.strerror or e}") from e


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_siblings(out: Path) -> list[Path]:
    """Temporary siblings of ``out`` (``.NAME.tmp-PID``, ``.NAME.old-PID``) whose process is gone."""
    removed = []
    for sibling in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = sibling.name.removeprefix(f".{out.name}.").partition("-")
        if kind in ("tmp", "old") and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(sibling, ignore_errors=True) if sibling.is_dir() else sibling.unlink(missing_ok=True)
            removed.append(sibling)
    return removed


def fresh_output_dir(out: PathLike, force: bool = False, keep: Sequence[PathLike | None] = ()) -> Path:
    """Create ``out``; a non-empty existing ``out`` is refused unless ``force`` (then emptied)."""
    out = Path(out)
    check_output(out, force, keep)
    if _is_non_empty(out):
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    _make_dir(out, out)
    return out


@contextmanager
def atomic_directory(out: PathLike, force: bool = False, keep: Sequence[PathLike | None] = ()) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to write into; it replaces ``out`` only on success.

    An existing non-empty ``out`` is refused unless ``force`` (and, forced, when it holds one of
    ``keep``). On any error (Ctrl-C included) the temporary directory is removed and ``out`` is left
    as it was.
    """
    out = Path(out)
    check_output(out, force, keep)
    _make_dir(out.parent, out)
    remove_stale_siblings(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    _make_dir(tmp, out)
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
