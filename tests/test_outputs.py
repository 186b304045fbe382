"""Output directories: --force never deletes an input (nor a link's target); stale temporary siblings are removed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from cli_helpers import one_red_line
from typer.testing import CliRunner

from melt_cli.app import app
from melt_core.checkpoints import convert_ouro_to_melt
from melt_core.errors import InvalidArgumentError, OutputExistsError
from melt_core.outputs import atomic_directory, check_output

runner = CliRunner()


def test_force_refuses_an_output_that_holds_the_inputs(tiny_ckpt, melt_ckpt, text_file, tmp_path):
    box = tmp_path / "sb3"
    box.mkdir()
    for name, src in (("student", melt_ckpt), ("teacher", tiny_ckpt)):
        shutil.copytree(src, box / name)
    shutil.copy(text_file, box / "small_train.jsonl")
    before = sorted(p.name for p in box.iterdir())
    args = [
        "transition",
        str(box / "student"),
        "--teacher",
        str(box / "teacher"),
        "--data",
        str(box / "small_train.jsonl"),
        "--out",
        str(box),
        "--force",
        "--steps",
        "1",
        "--seq-len",
        "32",
    ]
    line = one_red_line(runner.invoke(app, args))
    assert "--force would delete" in line and "an input of this command" in line
    assert sorted(p.name for p in box.iterdir()) == before  # nothing deleted
    pretrain = ["pretrain", "--data", str(box / "small_train.jsonl"), "--out", str(box), "--force", "--steps", "1"]
    assert "--force would delete" in one_red_line(runner.invoke(app, pretrain))

    sb2 = tmp_path / "sb2"
    shutil.copytree(tiny_ckpt, sb2 / "src")
    line = one_red_line(runner.invoke(app, ["convert", str(sb2 / "src"), str(sb2), "--force"]))
    assert "--force would delete" in line and (sb2 / "src" / "config.json").is_file()
    # an output that merely sits next to the input is replaced as asked
    convert_ouro_to_melt(sb2 / "src", sb2 / "melt")
    assert runner.invoke(app, ["convert", str(sb2 / "src"), str(sb2 / "melt"), "--force"]).exit_code == 0


def test_stale_temporary_siblings_of_a_killed_run_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    stale = tmp_path / f".out.tmp-{pid}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half written")
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "config.json").write_text(json.dumps({}))
    assert not stale.exists() and (tmp_path / "out" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _old_and_tmp_siblings(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_force_refuses_an_output_inside_a_data_folder(melt_ckpt, text_file, tmp_path):
    """A data folder is read recursively: replacing a folder inside it would delete training data."""
    data = tmp_path / "data"
    (data / "run").mkdir(parents=True)
    shutil.copy(text_file, data / "train.jsonl")
    shutil.copy(text_file, data / "run" / "more.jsonl")  # part of the data, and of --out
    args = ["transition", str(melt_ckpt), "--data", str(data), "--out", str(data / "run"), "--force"]
    line = one_red_line(runner.invoke(app, [*args, "--seq-len", "32", "--steps", "1"]))
    assert "--force would delete" in line and "an input of this command" in line
    assert sorted(p.name for p in data.rglob("*")) == ["more.jsonl", "run", "train.jsonl"]


def test_check_output_spares_what_an_input_is_made_of(tmp_path):
    data = tmp_path / "data"
    (data / "run").mkdir(parents=True)
    (data / "run" / "a.jsonl").write_text("{}\n")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x").write_text("x")
    (tmp_path / "link").symlink_to(data, target_is_directory=True)
    (tmp_path / "elsewhere" / "into-run").symlink_to(data / "run" / "a.jsonl")
    refused = [
        (data / "run", [data]),  # out inside an input folder
        (tmp_path / "link" / "run", [data]),  # ... reached through a symbolic link
        (data / "run", [tmp_path / "link"]),  # ... the input named through one
        (data / "run", [data / "run"]),  # out is the input
        (data, [data / "run" / "a.jsonl"]),  # out holds the input
        (data / "run", [tmp_path / "elsewhere" / "into-run"]),  # the input is a link to a file inside out
    ]
    for out, keep in refused:
        with pytest.raises(InvalidArgumentError, match="--force would delete .*an input of this command"):
            check_output(out, True, keep=keep)
    check_output(tmp_path / "elsewhere", True, keep=[data, None, tmp_path / "missing"])  # next to it: fine
    check_output(data / "new", True, keep=[data])  # nothing there yet: nothing to delete
    with pytest.raises(OutputExistsError):
        check_output(data / "run", False, keep=[data])


def test_a_symbolic_link_as_output_is_refused(tiny_ckpt, tmp_path):
    """Replacing a link would write through it, then fail half way and leave .NAME.old-PID behind."""
    real = tmp_path / "real"
    real.mkdir()
    (real / "keep.txt").write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    for force in (False, True):
        with pytest.raises(InvalidArgumentError, match="is a symbolic link; give the real path"):
            check_output(link, force)
    line = one_red_line(runner.invoke(app, ["convert", str(tiny_ckpt), str(link), "--force"]))
    assert "link is a symbolic link; give the real path" in line
    line = one_red_line(runner.invoke(app, ["random-model", str(link), "--force"]))
    assert "is a symbolic link" in line
    assert link.is_symlink() and sorted(p.name for p in real.iterdir()) == ["keep.txt"]
    assert _old_and_tmp_siblings(tmp_path) == []
    # a dangling link is refused alike (renaming a folder onto it fails half way too)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(InvalidArgumentError, match="symbolic link"):
        check_output(tmp_path / "dangling", False)


def test_data_reasoning_never_deletes_its_own_problem_file(tmp_path):
    """--out inside a forced --tokenizer-out: the tokenizer is written first, then the problems."""
    tok = tmp_path / "chains"
    args = ["data", "reasoning", "--n", "10", "--out", str(tok / "train.jsonl"), "--tokenizer-out", str(tok)]
    tok.mkdir()
    (tok / "old.txt").write_text("old")
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0
    assert (tok / "train.jsonl").is_file() and (tok / "tokenizer.json").is_file() and not (tok / "old.txt").exists()
    assert _old_and_tmp_siblings(tmp_path) == [] and _old_and_tmp_siblings(tok) == []
