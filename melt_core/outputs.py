"""Output directories that are never half-written and never swallow the command's inputs.

A non-empty output is refused unless forced; a forced output is refused all the same when it is,
contains or lies inside one of the command's inputs (``keep``), and an output that is a symbolic
link is refused. Writing goes to a temporary sibling that is renamed into place on success;
temporary siblings left by a killed run are removed. ``writing`` turns a failed write (a full disk
above all) into one line naming the output.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from .errors import InvalidArgumentError, OutputExistsError, OutputNotWritableError

PathLike = str | os.PathLike


def _is_non_empty(out: Path) -> bool:
    return out.exists() and (not out.is_dir() or any(out.iterdir()))


def _spellings(path: Path) -> set[Path]:
    """``path`` as given (made absolute) and with its symbolic links resolved: an input may be
    reached either way."""
    return {Path(os.path.abspath(path)), path.resolve()}


def _deletes_part_of(out: Path, item: Path) -> str | None:
    """How replacing ``out`` would delete (part of) the input ``item``, or None."""
    for o in _spellings(out):
        for i in _spellings(item):
            if i == o or o in i.parents:
                return f"--force would delete {item}, an input of this command, with {out}"
            if i in o.parents and item.is_dir():  # a data folder is read recursively
                return f"--force would delete {out}, which lies inside {item}, an input of this command"
    return None


def check_output(
    out: PathLike, force: bool, keep: Sequence[PathLike | None] = (), hint: str = "pass --force to replace it"
) -> None:
    """Refuse an ``out`` that cannot be created, a symbolic link (replacing it would write through it
    or fail half way), a non-empty one unless ``force``, and a forced one that is, contains or lies
    inside an input folder (``keep``). Cheap: run it before any work."""
    if str(out) == "":
        raise InvalidArgumentError("the output path is empty; name a folder")
    out = Path(out)
    try:
        os.fsencode(out).decode("utf-8")
    except UnicodeDecodeError:  # safetensors and tokenizers write UTF-8 paths only
        raise InvalidArgumentError(f"{out} is not a valid UTF-8 path; rename it") from None
    if out.is_symlink():
        raise InvalidArgumentError(f"{out} is a symbolic link; give the real path")
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
    if target == Path.cwd().resolve() or target in Path.cwd().resolve().parents or target == Path.home().resolve():
        raise InvalidArgumentError(
            f"--force would delete {out} (the current folder, a folder above it, or home); name a new folder"
        )
    for item in keep:
        if item is not None and Path(item).exists():
            danger = _deletes_part_of(out, Path(item))
            if danger:
                raise InvalidArgumentError(f"{danger}; choose another output")


# What torch.save's writer raises when a write fails; it does not say why.
_TORCH_WRITE_FAILURES = ("PytorchStreamWriter failed", "file write failed", "unexpected pos", "open file failed")
# Rust's io::Error as safetensors and tokenizers show it: "... (os error 28)", or the older "Os { code: 28, ..."
_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)|Os \{ code: (\d+)|because of errno (\d+)")


def _disk_full(out: Path) -> bool:
    """Whether the file system ``out`` is on has (next to) no space left."""
    try:
        st = os.statvfs(next(p for p in [out, *out.parents] if p.exists()))
    except (OSError, AttributeError):  # no statvfs on Windows
        return False
    free = st.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else st.f_bavail  # root may use reserved blocks
    return free * st.f_frsize < 1 << 20


def _write_failure(e: BaseException, out: Path) -> str | None:
    """Why the writer failed when ``e`` is a failed write of safetensors, tokenizers or torch.save
    (``No space left on device``); None for any other error."""
    text = str(e)
    if not (isinstance(e, (SafetensorError, RuntimeError)) or type(e) is Exception):  # tokenizers: bare Exception
        return None
    code = _OS_ERROR_CODE.search(text)
    if code:
        return os.strerror(int(next(c for c in code.groups() if c)))
    if not isinstance(e, RuntimeError):
        return None
    if text.startswith("Parent directory "):
        return os.strerror(errno.ENOENT)
    if not any(s in text for s in _TORCH_WRITE_FAILURES):
        return None
    if "strerror: " in text:
        return text.rsplit("strerror: ", 1)[1].strip()
    return os.strerror(errno.ENOSPC) if _disk_full(out) else "write failed"


@contextmanager
def writing(out: PathLike) -> Iterator[None]:
    """Write ``out`` under this block: a failed write (OSError, or the errors safetensors, tokenizers
    and torch.save raise instead, a full disk above all) becomes one OutputNotWritableError
    ``cannot write OUT: No space left on device``; any other error passes unchanged. Wrap the writes
    only, never the reading of inputs, whose errors would be blamed on ``out``."""
    try:
        yield
    except OSError as e:
        raise OutputNotWritableError(f"cannot write {out}: {e.strerror or e}") from e
    except Exception as e:
        reason = _write_failure(e, Path(out))
        if reason is None:
            raise
        raise OutputNotWritableError(f"cannot write {out}: {reason}") from e


def _make_dir(path: Path, out: Path) -> None:
    with writing(out):
        path.mkdir(parents=True, exist_ok=True)


def pid_alive(pid: int) -> bool:
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
        if kind in ("tmp", "old") and pid.isdigit() and not pid_alive(int(pid)):
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

    An existing non-empty ``out`` is refused unless ``force`` (and, forced, when it is, holds or lies
    inside one of ``keep``). On any error (Ctrl-C included) the temporary directory is removed and
    ``out`` is left as it was.
    """
    out = Path(out)
    check_output(out, force, keep)
    _make_dir(out.parent, out)
    remove_stale_siblings(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
    _make_dir(tmp, out)
    try:
        yield tmp
        with writing(out):
            if out.exists():
                out.rename(old)
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():  # the new one could not be put in its place
            old.rename(out)
        raise
    # the new output is in place; an old one that cannot be removed now is removed by the next run
    shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
