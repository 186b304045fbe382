"""Output directories: --force never deletes an input; stale temporary siblings are removed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from cli_helpers import one_red_line
from typer.testing import CliRunner

from melt_cli.app import app
from melt_core.checkpoints import convert_ouro_to_melt
from melt_core.checkpoints.outputs import atomic_directory

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
