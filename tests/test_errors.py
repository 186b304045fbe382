"""Bad input and faults a user meets: each gives ONE red line, exit status 1, and writes nothing.

``CASES`` is the list to grow: (id, command line, the message it must contain). ``{tiny}``,
``{melt}``, ``{text}`` and ``{tmp}`` are the tiny Ouro checkpoint, the shared MELT checkpoint, the
sample corpus and a fresh temporary directory; ``setup`` files are written into ``{tmp}`` first.
"""

from __future__ import annotations

import shutil

import pytest
from cli_helpers import one_red_line
from typer.testing import CliRunner

from melt_cli.app import app

runner = CliRunner()
BINARY = b"\x00\x01\xff\xfe binary \x00"
LATIN1 = "caf\xe9 na\xefve".encode("latin-1")
TRAIN = ["--seq-len", "32", "--steps", "1"]

CASES = [
    # values validated where they are parsed; 0 never means "default"
    (
        "transition --steps 0",
        ["transition", "{melt}", "--data", "{text}", "--out", "{tmp}/o", "--steps", "0"],
        "--steps must be >= 1, got 0",
    ),
    (
        "pretrain --loops 0",
        ["pretrain", "--data", "{text}", "--out", "{tmp}/o", "--loops", "0"],
        "--loops must be >= 1, got 0",
    ),
    ("eval --batch-size 0", ["eval", "{tiny}", "--data", "{text}", "--batch-size", "0"], "batch size must be >= 1"),
    (
        "eval --seq-len too long",
        ["eval", "{tiny}", "--data", "{text}", "--seq-len", "999999"],
        "exceeds the model's maximum 2048",
    ),
    ("eval --loops 0", ["eval", "{tiny}", "--data", "{text}", "--loops", "2,0"], "must be >= 1, got 0"),
    (
        "transition --seq-len too long",
        ["transition", "{melt}", "--data", "{text}", "--out", "{tmp}/o", "--seq-len", "4096", "--steps", "1"],
        "exceeds the model's maximum 2048",
    ),
    ("eval --device tpu", ["eval", "{tiny}", "--data", "{text}", "--device", "tpu"], "unknown device"),
    (
        "random-model --vocab-size 2",
        ["random-model", "{tmp}/o", "--vocab-size", "2"],
        "vocab size must be at least 259",
    ),
    (
        "pretrain --vocab-size 0",
        ["pretrain", "--data", "{text}", "--out", "{tmp}/o", "--vocab-size", "0"],
        "--vocab-size must be at least 259",
    ),
    (
        "--batch-tokens not a multiple",
        [
            "transition",
            "{melt}",
            "--data",
            "{text}",
            "--out",
            "{tmp}/o",
            "--seq-len",
            "32",
            "--batch-tokens",
            "33",
            "--steps",
            "1",
        ],
        "must be a multiple of seq_len",
    ),
    (
        "quickstart --eval-sequences 0",
        ["quickstart", "--out", "{tmp}/o", "--eval-sequences", "0"],
        "--eval-sequences must be >= 1",
    ),
    ("generate --kv-dtype int2", ["generate", "{tiny}", "-p", "hi", "--kv-dtype", "int2"], "unknown KV dtype"),
    (
        "generate --kv-group-size 3",
        ["generate", "{tiny}", "-p", "hi", "--kv-dtype", "int8", "--kv-group-size", "3"],
        "group size must be even",
    ),
    (
        "profile --kv-group-size 48",
        ["profile", "memory", "--preset", "ouro-1.4b", "--kv-dtype", "int4", "--kv-group-size", "48"],
        "must divide head_dim 128",
    ),
    ("generate --temperature nan", ["generate", "{tiny}", "-p", "hi", "--temperature", "nan"], "must be finite"),
    ("generate --temperature inf", ["generate", "{tiny}", "-p", "hi", "--temperature", "inf"], "must be finite"),
    (
        "generate --top-p nan",
        ["generate", "{tiny}", "-p", "hi", "--temperature", "1", "--top-p", "nan"],
        "must be finite",
    ),
    (
        "quickstart --batch-tokens",
        ["quickstart", "--out", "{tmp}/o", "--batch-tokens", "100"],
        "must be a positive multiple of --seq-len",
    ),
    (
        "convert --policy mean --h0 zeros",
        ["convert", "{tiny}", "{tmp}/o", "--policy", "mean", "--h0", "zeros"],
        "applies to learned gates",
    ),
    # unwritable outputs (a path below a regular file cannot be created, even by root)
    ("convert to an unwritable path", ["convert", "{tiny}", "{tmp}/file/out"], "cannot write"),
    ("random-model to an unwritable path", ["random-model", "{tmp}/file/out"], "cannot write"),
    (
        "transition to an unwritable path",
        ["transition", "{melt}", "--data", "{text}", "--out", "{tmp}/file/o", *TRAIN],
        "cannot write",
    ),
    (
        "distill to an unwritable path",
        ["distill", "{melt}", "--data", "{text}", "--out", "{tmp}/file/o", *TRAIN],
        "cannot write",
    ),
    (
        "pretrain to an unwritable path",
        ["pretrain", "--data", "{text}", "--out", "{tmp}/file/o", *TRAIN],
        "cannot write",
    ),
    ("quickstart to an unwritable path", ["quickstart", "--out", "{tmp}/file/o"], "cannot write"),
    (
        "--plot to an unwritable path",
        ["profile", "memory", "--preset", "ouro-1.4b", "--plot", "{tmp}/file/m.png"],
        "cannot write",
    ),
    (
        "--plot with a non-image suffix",
        ["profile", "memory", "--preset", "ouro-1.4b", "--plot", "{tmp}/m.txt"],
        "use an image file name",
    ),
    # binary or non-UTF-8 text
    (
        "binary .txt data",
        ["transition", "{melt}", "--data", "{tmp}/bin.txt", "--out", "{tmp}/o", *TRAIN],
        "is a binary file",
    ),
    ("latin-1 .txt data", ["pretrain", "--data", "{tmp}/latin.txt", "--out", "{tmp}/o", *TRAIN], "is not UTF-8 text"),
    ("binary .jsonl data", ["eval", "{tiny}", "--data", "{tmp}/bin.jsonl"], "not UTF-8 text"),
    ("binary prompt file", ["generate", "{tiny}", "--prompt-file", "{tmp}/bin.txt"], "is a binary file"),
    ("latin-1 prompt file", ["generate", "{tiny}", "--prompt-file", "{tmp}/latin.txt"], "is not UTF-8 text"),
    ("binary prompts file", ["generate", "{tiny}", "--prompts-file", "{tmp}/bin.jsonl"], "not UTF-8 text"),
    # checkpoints and runs
    ("corrupt tokenizer.json", ["generate", "{tmp}/broken", "-p", "hi"], "is not a valid tokenizer file"),
    ("missing --resume", ["distill", "{melt}", "--data", "{text}", "--resume", "{tmp}/nope", *TRAIN], "does not exist"),
    (
        "MELT checkpoint as the teacher",
        ["distill", "{melt}", "--teacher", "{melt}", "--data", "{text}", "--out", "{tmp}/o", *TRAIN],
        "the teacher must be Ouro",
    ),
    (
        "MELT checkpoint as eval's teacher",
        ["eval", "{tiny}", "--data", "{text}", "--teacher", "{melt}"],
        "a teacher is an Ouro LoopLM",
    ),
    (
        "Ouro checkpoint as the student",
        ["transition", "{tiny}", "--data", "{text}", "--out", "{tmp}/o", *TRAIN],
        "melt convert",
    ),
]


@pytest.mark.parametrize(("args", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_one_red_line(args, expected, tiny_ckpt, melt_ckpt, text_file, tmp_path):
    (tmp_path / "file").write_text("a regular file")
    (tmp_path / "bin.txt").write_bytes(BINARY)
    (tmp_path / "bin.jsonl").write_bytes(BINARY)
    (tmp_path / "latin.txt").write_bytes(LATIN1)
    shutil.copytree(tiny_ckpt, tmp_path / "broken")
    (tmp_path / "broken" / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    names = {"tiny": tiny_ckpt, "melt": melt_ckpt, "text": text_file, "tmp": tmp_path}
    before = sorted(p.name for p in tmp_path.iterdir())
    line = one_red_line(runner.invoke(app, [a.format(**names) for a in args]))
    assert expected in line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing half-written


def test_ctrl_c_during_start_up_is_one_line(tiny_ckpt, monkeypatch):
    import melt_core.inference.generate as generate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate, "load_model", interrupted)
    result = runner.invoke(app, ["generate", str(tiny_ckpt), "-p", "hi"])
    assert result.exit_code == 130
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert lines[0].startswith("error: interrupted") and "Traceback" not in result.stderr


def test_messages_are_text_not_markup(monkeypatch):
    """A message with square brackets (``pip install 'melt[plot]'``) is printed as written."""
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    result = runner.invoke(app, ["profile", "memory", "--preset", "ouro-1.4b", "--loops", "1", "--plot", "m.png"])
    assert "pip install 'melt[plot]'" in one_red_line(result)
