"""A full disk: every command gives one red line and leaves no temporary file; the token cache, an
optimisation, is skipped instead.

The writers are made to fail as a full disk fails them (safetensors, torch.save, tokenizers and
plain file writes each report it differently), so the logic is tested on every machine; the tests
on a real full disk (a small tmpfs) need root and are skipped where it cannot be mounted.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections import namedtuple

import pytest
import torch
from cli_helpers import one_red_line
from safetensors import SafetensorError
from typer.testing import CliRunner

import melt_core.checkpoints.io as io_module
import melt_core.outputs as outputs_module
import melt_core.tasks.chains as chains_module
from melt_cli.app import app
from melt_core.data import cache_dir, load_token_stream, tokenize_documents
from melt_core.errors import CorruptCheckpointError, OutputNotWritableError
from melt_core.outputs import writing

runner = CliRunner()
NO_SPACE = os.strerror(errno.ENOSPC)
# what each writer raises on a full disk (torch's message does not say why)
SAFETENSORS_FULL = SafetensorError(f"Error while serializing: I/O error: {NO_SPACE} (os error 28)")
TORCH_FULL = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
TOKENIZERS_FULL = Exception(f"{NO_SPACE} (os error 28)")


def _error_line(result) -> str:
    """``one_red_line``, where a progress bar started before the failure may stand above the error."""
    assert result.exit_code == 1, result.output
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return errors[0]


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())


def _full_statvfs(path):
    """``os.statvfs`` of a file system with no block left."""
    Result = namedtuple("Result", "f_frsize f_bfree f_bavail")
    return Result(4096, 0, 0)


# --- writing(): which failures are write failures ---------------------------------------------------
OLD_SAFETENSORS_FULL = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "x" })'
TORCH_PREFIX = "[enforce fail at inline_container.cc:595] . "
DENIED = os.strerror(errno.EACCES)
TORCH_WRITE_FAILED = TORCH_PREFIX + "PytorchStreamWriter failed writing file data/0: file write failed"


@pytest.mark.parametrize(
    "error, reason",
    [
        (OSError(errno.ENOSPC, NO_SPACE), NO_SPACE),
        (PermissionError(errno.EACCES, DENIED), DENIED),
        (SAFETENSORS_FULL, NO_SPACE),
        (SafetensorError(OLD_SAFETENSORS_FULL), NO_SPACE),
        (TOKENIZERS_FULL, NO_SPACE),
        (TORCH_FULL, "write failed"),
        (RuntimeError(TORCH_WRITE_FAILED), "write failed"),
        (RuntimeError(TORCH_PREFIX + "open file failed with strerror: Permission denied"), DENIED),
        (RuntimeError(TORCH_PREFIX + "open file failed because of errno 13 on fopen: , file path: x"), DENIED),
        (RuntimeError("Parent directory /nowhere does not exist."), os.strerror(errno.ENOENT)),
    ],
)
def test_writing_turns_a_failed_write_into_one_line(error, reason, tmp_path):
    with pytest.raises(OutputNotWritableError) as caught, writing(tmp_path / "out"):
        raise error
    assert str(caught.value) == f"cannot write {tmp_path / 'out'}: {reason}"
    assert caught.value.__cause__ is error


def test_writing_says_no_space_when_torch_filled_the_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs_module.os, "statvfs", _full_statvfs)
    with pytest.raises(OutputNotWritableError, match=f"cannot write .*out: {NO_SPACE}$"), writing(tmp_path / "out"):
        raise TORCH_FULL


@pytest.mark.parametrize(
    "error",
    [
        SafetensorError("Error while deserializing header: HeaderTooLarge"),
        RuntimeError("CUDA out of memory"),
        RuntimeError("expected scalar type Float but found Half"),
        Exception("something else"),
        ValueError(f"{NO_SPACE} (os error 28)"),  # not a writer's error type
        CorruptCheckpointError("already one line"),
        KeyboardInterrupt(),
    ],
)
def test_writing_leaves_other_errors_alone(error, tmp_path):
    with pytest.raises(type(error)) as caught, writing(tmp_path / "out"):
        raise error
    assert caught.value is error


# --- every writer, made to fail as on a full disk ---------------------------------------------------
def _fail_with(error):
    def save(*args, **kwargs):
        raise error

    return save


def test_convert_onto_a_full_disk(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(io_module, "save_file", _fail_with(SAFETENSORS_FULL))
    line = _error_line(runner.invoke(app, ["convert", str(tiny_ckpt), str(tmp_path / "melt")]))
    assert line == f"error: cannot write {tmp_path / 'melt'}: {NO_SPACE}"
    assert list(tmp_path.iterdir()) == []


def test_random_model_onto_a_full_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(io_module, "save_file", _fail_with(SAFETENSORS_FULL))
    line = one_red_line(runner.invoke(app, ["random-model", str(tmp_path / "tiny"), "--vocab-size", "300"]))
    assert line == f"error: cannot write {tmp_path / 'tiny'}: {NO_SPACE}"
    assert list(tmp_path.iterdir()) == []


def test_forced_output_on_a_full_disk_keeps_the_old_one(tiny_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "melt"
    out.mkdir()
    (out / "old.txt").write_text("old")
    monkeypatch.setattr(io_module, "save_file", _fail_with(SAFETENSORS_FULL))
    _error_line(runner.invoke(app, ["convert", str(tiny_ckpt), str(out), "--force"]))
    assert _files(tmp_path) == ["melt/old.txt"]


def test_the_token_cache_is_skipped_on_a_full_disk(text_file, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("MELT_CACHE_DIR", str(tmp_path / "cache"))

    def half_written(obj, path, *args, **kwargs):
        with open(path, "wb") as f:  # torch.save leaves what it wrote
            f.write(b"PK\x03\x04 half")
        raise TORCH_FULL

    monkeypatch.setattr(torch, "save", half_written)
    expected = tokenize_documents(text_file, tokenizer)
    for _ in range(2):  # not cached: tokenised again, and again nothing left behind
        assert torch.equal(load_token_stream(text_file, tokenizer), expected)
        assert _files(tmp_path / "cache") == []
    monkeypatch.undo()
    monkeypatch.setenv("MELT_CACHE_DIR", str(tmp_path / "cache"))
    assert torch.equal(load_token_stream(text_file, tokenizer), expected)
    assert [p.suffix for p in cache_dir().iterdir()] == [".pt"]


def test_the_token_cache_is_skipped_when_its_folder_cannot_be_made(text_file, tokenizer, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("MELT_CACHE_DIR", str(tmp_path / "file"))
    assert torch.equal(load_token_stream(text_file, tokenizer), tokenize_documents(text_file, tokenizer))


def test_the_token_cache_passes_other_errors_on(text_file, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("MELT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(torch, "save", _fail_with(RuntimeError("not a write failure")))
    with pytest.raises(RuntimeError, match="not a write failure"):
        load_token_stream(text_file, tokenizer)
    assert _files(tmp_path / "cache") == []


class _FullFile:
    """A file open for writing on a disk that fills after ``room`` bytes."""

    def __init__(self, path, mode, room=100):
        self.f, self.room = open(path, mode), room  # noqa: SIM115 - closed by __exit__

    def write(self, text):
        if len(text) > self.room:
            self.f.write(text[: self.room])
            raise OSError(errno.ENOSPC, NO_SPACE)
        self.room -= len(text)
        return self.f.write(text)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_data_reasoning_onto_a_full_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(chains_module, "open", _FullFile, raising=False)
    out = tmp_path / "p.jsonl"
    line = one_red_line(runner.invoke(app, ["data", "reasoning", "--n", "50", "--out", str(out)]))
    assert line == f"error: cannot write {out}: {NO_SPACE}"
    assert list(tmp_path.iterdir()) == []


def test_data_reasoning_tokenizer_onto_a_full_disk(tmp_path, monkeypatch):
    import melt_cli.commands.data as data_command

    monkeypatch.setattr(data_command, "save_tokenizer", _fail_with(TOKENIZERS_FULL))
    tok = tmp_path / "tok"
    args = ["data", "reasoning", "--n", "5", "--out", str(tmp_path / "p.jsonl"), "--tokenizer-out", str(tok)]
    assert one_red_line(runner.invoke(app, args)) == f"error: cannot write {tok}: {NO_SPACE}"
    assert list(tmp_path.iterdir()) == []


# --- a real full disk -------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 5 MiB tmpfs (root only; skipped where it cannot be mounted), unmounted afterwards."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(disk)], capture_output=True)
    except OSError as e:
        pytest.skip(f"cannot run mount: {e}")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def _fill(disk, leave=0):
    """Fill ``disk`` up to ``leave`` free bytes."""
    st = os.statvfs(disk)
    try:
        with open(disk / "filler", "ab") as f:
            f.write(b"\0" * (st.f_bavail * st.f_frsize - leave))
    except OSError:
        pass


def test_a_real_full_disk(small_disk, tiny_ckpt, text_file, tokenizer, monkeypatch):
    _fill(small_disk, leave=64 * 1024)  # room for folders and config.json, not for the weights
    for args, out in (
        (["convert", str(tiny_ckpt)], small_disk / "melt"),
        (["random-model", "--vocab-size", "300"], small_disk / "tiny"),
        (["data", "reasoning", "--n", "5000", "--out"], small_disk / "p.jsonl"),
    ):
        line = _error_line(runner.invoke(app, [*args, str(out)]))
        assert line == f"error: cannot write {out}: {NO_SPACE}", args
        assert _files(small_disk) == ["filler"], args

    _fill(small_disk)
    assert os.statvfs(small_disk).f_bavail == 0
    monkeypatch.setenv("MELT_CACHE_DIR", str(small_disk / "cache"))
    assert torch.equal(load_token_stream(text_file, tokenizer), tokenize_documents(text_file, tokenizer))
    assert _files(small_disk) == ["filler"]
