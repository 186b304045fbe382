"""Bad input and faults a user meets: each gives ONE red line, exit status 1, and writes nothing.

``CASES`` is the list to grow: (id, command line, the message it must contain). ``{tiny}``,
``{melt}``, ``{text}`` and ``{tmp}`` are the tiny Ouro checkpoint, the shared MELT checkpoint, the
sample corpus and a fresh temporary directory; ``setup`` files are written into ``{tmp}`` first.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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
    (
        "eval --batch-size 0",
        ["eval", "text", "{tiny}", "--data", "{text}", "--batch-size", "0"],
        "batch size must be >= 1",
    ),
    (
        "eval --seq-len too long",
        ["eval", "text", "{tiny}", "--data", "{text}", "--seq-len", "999999"],
        "exceeds the model's maximum 2048",
    ),
    ("eval --loops 0", ["eval", "text", "{tiny}", "--data", "{text}", "--loops", "2,0"], "must be >= 1, got 0"),
    (
        "transition --seq-len too long",
        ["transition", "{melt}", "--data", "{text}", "--out", "{tmp}/o", "--seq-len", "4096", "--steps", "1"],
        "exceeds the model's maximum 2048",
    ),
    ("eval --device tpu", ["eval", "text", "{tiny}", "--data", "{text}", "--device", "tpu"], "unknown device"),
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
    ("binary .jsonl data", ["eval", "text", "{tiny}", "--data", "{tmp}/bin.jsonl"], "not UTF-8 text"),
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
        ["eval", "text", "{tiny}", "--data", "{text}", "--teacher", "{melt}"],
        "a teacher is an Ouro LoopLM",
    ),
    (
        "Ouro checkpoint as the student",
        ["transition", "{tiny}", "--data", "{text}", "--out", "{tmp}/o", *TRAIN],
        "melt convert",
    ),
    # hostile values (issue 21)
    (
        "generate --seed 1e20",
        ["generate", "{tiny}", "-p", "hi", "--seed", "1e20"],
        "--seed takes an integer, got '1e20'",
    ),
    (
        "generate --seed beyond torch's range",
        ["generate", "{tiny}", "-p", "hi", "--temperature", "1", "--seed", "100000000000000000000"],
        "seed must be in 0..18446744073709551615",
    ),
    ("pretrain --seed 1e20", ["pretrain", "--data", "{text}", "--out", "{tmp}/o", "--seed", "1e20"], "--seed takes"),
    ("Hub revision with ..", ["info", "owner/name@../../x"], "revision '../../x' is not a branch, tag or commit"),
    (
        "generate: a KV cache larger than any memory",
        ["generate", "{tiny}", "-p", "hi", "--loops", "1000000", "--max-new-tokens", "2046"],
        "lower --loops, --max-new-tokens or --batch-size",
    ),
    # found by a sweep of hostile inputs (issue 21)
    (
        "--chunk-size 0 before the run folder",
        ["transition", "{melt}", "--data", "{text}", "--out", "{tmp}/o", *TRAIN, "--chunk-size", "0"],
        "--chunk-size must be >= 1",
    ),
    *[
        (
            f"{flag} {value}",
            ["pretrain", "--data", "{text}", "--out", "{tmp}/o", *TRAIN, flag, value],
            f"{flag} must be >= {least}",
        )
        for flag, value, least in [
            ("--warmup-steps", "-5", 0),
            ("--save-every", "-1", 0),
            ("--keep-last", "-3", 0),
            ("--eval-batches", "0", 1),
        ]
    ],
    (
        "pretrain --vocab-size 10^9",
        ["pretrain", "--data", "{text}", "--out", "{tmp}/o", *TRAIN, "--vocab-size", "1000000000"],
        "--vocab-size must be at most",
    ),
    (
        "data reasoning --hops 1-10^9",
        ["data", "reasoning", "--out", "{tmp}/p.jsonl", "--n", "10", "--hops", "1-1000000000"],
        "spans more than",
    ),
    ("--threads 100000", ["--threads", "100000", "info", "{tiny}"], "--threads must be at most"),
    (
        "--data a device",
        ["transition", "{melt}", "--data", "{tmp}/zero.txt", "--out", "{tmp}/o", *TRAIN],
        "is not a regular file",
    ),
    (
        "--prompt-file a device",
        ["generate", "{tiny}", "--prompt-file", "{tmp}/zero.txt"],
        "is not a regular file",
    ),
    ("--out not UTF-8", ["random-model", "{tmp}/r_\udcff"], "is not a valid UTF-8 path"),
]


@pytest.mark.parametrize(("args", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_one_red_line(args, expected, tiny_ckpt, melt_ckpt, text_file, tmp_path):
    (tmp_path / "file").write_text("a regular file")
    (tmp_path / "zero.txt").symlink_to("/dev/zero")
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


# --- hostile configs and inputs (issue 21) ---


def _hand_made(src, tmp_path, config: dict | None = None):
    """A copy of checkpoint ``src`` in ``tmp_path/ckpt`` with ``config`` merged into its config.json."""
    import json

    out = tmp_path / "ckpt"
    shutil.copytree(src, out)
    if config:
        raw = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**raw, **config}))
    return out


def _refused(args, tmp_path, **kwargs) -> str:
    """The one red line of ``melt args``, which must leave ``tmp_path`` as it was."""
    before = sorted(p.name for p in tmp_path.rglob("*"))
    line = one_red_line(runner.invoke(app, [str(a) for a in args], **kwargs))
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    return line


@pytest.mark.parametrize(
    ("base", "config", "expected"),
    [
        ("melt_ckpt", {"melt": [1, 2]}, "config field melt must be a JSON object"),
        ("melt_ckpt", {"melt": "gate"}, "config field melt must be a JSON object"),
        ("melt_ckpt", {"melt": {"z0": "0.1"}}, "melt.z0 must be a number, got '0.1'"),
        ("tiny_ckpt", {"rope_scaling": "linear"}, "config field rope_scaling must be a JSON object or null"),
        ("tiny_ckpt", {"hidden_size": "48", "head_dim": None}, "config field hidden_size must be an integer"),
        ("tiny_ckpt", {"max_position_embeddings": "2048"}, "config field max_position_embeddings must be an integer"),
        ("tiny_ckpt", {"rope_theta": "1e6"}, "config field rope_theta must be a positive number, got '1e6'"),
        ("tiny_ckpt", {"rope_theta": 0}, "config field rope_theta must be a positive number, got 0"),
        ("tiny_ckpt", {"rope_theta": -10000.0}, "config field rope_theta must be a positive number"),
        ("tiny_ckpt", {"rms_norm_eps": 0}, "config field rms_norm_eps must be a positive number, got 0"),
        ("tiny_ckpt", {"rms_norm_eps": -1e-6}, "config field rms_norm_eps must be a positive number"),
        ("tiny_ckpt", {"eos_token_id": "0"}, "config field eos_token_id must be a token id"),
        ("tiny_ckpt", {"pad_token_id": 100000}, "pad_token_id 100000 is not in the vocabulary"),
        ("tiny_ckpt", {"model_type": ["ouro"]}, "has model_type ['ouro']"),
    ],
)
@pytest.mark.parametrize("command", ["info", "generate"])
def test_hostile_config_is_one_line(base, config, expected, command, request, tmp_path):
    ckpt = _hand_made(request.getfixturevalue(base), tmp_path, config)
    args = ["info", ckpt] if command == "info" else ["generate", ckpt, "-p", "hi", "--max-new-tokens", "1"]
    line = _refused(args, tmp_path)
    assert expected in line and str(ckpt / "config.json") in line


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"vocab_size": ' + "1" * 5000 + "}"])
def test_config_json_python_cannot_parse_is_one_line(text, tiny_ckpt, tmp_path):
    ckpt = _hand_made(tiny_ckpt, tmp_path)
    (ckpt / "config.json").write_text(text)
    assert f"{ckpt / 'config.json'} is not valid JSON" in _refused(["info", ckpt], tmp_path)


def _sharded(tiny_ckpt, tmp_path, shard_name):
    """The tiny checkpoint as one shard ``part.safetensors`` whose index maps every tensor to ``shard_name``."""
    import json

    from safetensors import safe_open

    ckpt = _hand_made(tiny_ckpt, tmp_path)
    (ckpt / "model.safetensors").rename(ckpt / "part.safetensors")
    with safe_open(str(ckpt / "part.safetensors"), "pt") as f:
        weight_map = {name: shard_name for name in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return ckpt


@pytest.mark.parametrize(
    "shard", [1, None, "../tiny-ouro/model.safetensors", "{tiny}/model.safetensors", "sub/../../ckpt/part.safetensors"]
)
@pytest.mark.parametrize("command", ["info", "generate"])
def test_index_shards_live_in_the_checkpoint(shard, command, tiny_ckpt, tmp_path):
    shard = shard.format(tiny=tiny_ckpt) if isinstance(shard, str) else shard
    ckpt = _sharded(tiny_ckpt, tmp_path, shard)
    args = ["info", ckpt] if command == "info" else ["generate", ckpt, "-p", "hi", "--max-new-tokens", "1"]
    line = _refused(args, tmp_path)
    assert f"is mapped to {shard!r}; a shard must be a file name in the checkpoint directory" in line


def test_a_plain_shard_name_still_loads(tiny_ckpt, tmp_path):
    ckpt = _sharded(tiny_ckpt, tmp_path, "part.safetensors")
    result = runner.invoke(app, ["info", str(ckpt), "--json"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{ messages.__class__.__mro__ }}", "SecurityError"),
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "SecurityError"),
        ("{% for m in %}", "TemplateSyntaxError"),
        ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ],
)
def test_chat_template_jinja_refuses_is_one_line(template, expected, tiny_ckpt, tmp_path):
    ckpt = _hand_made(tiny_ckpt, tmp_path)
    (ckpt / "chat_template.jinja").write_text(template)
    line = _refused(["generate", ckpt, "-p", "hi", "--chat", "--max-new-tokens", "1"], tmp_path)
    assert f"{ckpt / 'chat_template.jinja'}: the chat template cannot be applied: {expected}" in line


@pytest.mark.parametrize(("data", "expected"), [(LATIN1, "is not UTF-8 (byte 3: b'\\xe9')"), (BINARY, "binary")])
def test_stdin_that_is_not_utf8_is_one_line(data, expected, tiny_ckpt, tmp_path):
    line = _refused(["generate", tiny_ckpt, "--max-new-tokens", "1"], tmp_path, input=data)
    assert "the text on stdin" in line and expected in line


def test_prompt_that_is_not_utf8_is_one_line(tiny_ckpt, tmp_path):
    """A command-line argument that is not UTF-8 reaches Python as surrogate characters."""
    line = _refused(["generate", tiny_ckpt, "-p", "caf\udce9", "--max-new-tokens", "1"], tmp_path)
    assert "the prompt is not UTF-8 text" in line


def test_info_reads_safetensors_headers_only(tiny_ckpt, monkeypatch):
    """``melt info`` neither reads nor maps tensor data: a huge checkpoint is sized instantly."""
    import melt_core.checkpoints.io as io

    def no_data(*args, **kwargs):
        raise AssertionError("melt info opened the tensor data")

    monkeypatch.setattr(io, "safe_open", no_data)
    result = runner.invoke(app, ["info", str(tiny_ckpt), "--json"])
    assert result.exit_code == 0, result.output


def test_tensor_outside_the_file_is_one_line(tiny_ckpt, tmp_path):
    """A header whose tensor lies past the end of the data (the data cut, the header intact)."""
    ckpt = _hand_made(tiny_ckpt, tmp_path)
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[:-4])
    line = _refused(["info", ckpt], tmp_path)
    assert f"{ckpt / 'model.safetensors'} is not a valid safetensors file (truncated or corrupt)" in line


def _count_layers(monkeypatch, limit: int = 100) -> None:
    """Fail fast when more than ``limit`` decoder layers are built (a model as deep as its config)."""
    from melt_core.models import layers

    built, init = [0], layers.DecoderLayer.__init__

    def counted(self, *args, **kwargs):
        built[0] += 1
        assert built[0] <= limit, "a model was built layer by layer"
        init(self, *args, **kwargs)

    monkeypatch.setattr(layers.DecoderLayer, "__init__", counted)


def test_info_of_a_very_deep_config_is_bounded(tiny_ckpt, tmp_path, monkeypatch):
    import json

    def parameters(layers: int) -> int:
        ckpt = _hand_made(tiny_ckpt, tmp_path / str(layers), {"num_hidden_layers": layers})
        (ckpt / "model.safetensors").unlink()  # config only
        result = runner.invoke(app, ["info", str(ckpt), "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["num_parameters"]

    _count_layers(monkeypatch)
    one, two = parameters(1), parameters(2)
    assert parameters(10_000_000) == one + (10_000_000 - 1) * (two - one)


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["info"], "is missing 109999967 tensor(s) the config needs: model.layers.3."),
        (["generate", "-p", "hi"], "the KV cache (4 loops, 1 row of 257 positions) needs"),  # before the weights
    ],
)
def test_very_deep_config_with_small_weights_is_one_line(command, expected, tiny_ckpt, tmp_path, monkeypatch):
    _count_layers(monkeypatch)
    ckpt = _hand_made(tiny_ckpt, tmp_path, {"num_hidden_layers": 10_000_000})
    assert expected in _refused([command[0], ckpt, *command[1:]], tmp_path)


def test_nan_weights_are_one_warning_line(tiny_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = _hand_made(tiny_ckpt, tmp_path)
    weights = load_file(str(ckpt / "model.safetensors"))
    weights["model.norm.weight"][0] = float("nan")
    weights["lm_head.weight"][1, 1] = float("inf")
    save_file(weights, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    result = runner.invoke(app, ["generate", str(ckpt), "-p", "hi", "--max-new-tokens", "1"])
    assert result.exit_code == 0, result.output
    warnings = [ln for ln in result.stderr.splitlines() if "NaN" in ln or "warn" in ln]
    assert len(warnings) == 1 and warnings[0].startswith("warning: "), result.stderr
    assert "2 tensor(s) hold NaN or infinite values" in warnings[0]
    assert "lm_head.weight, model.norm.weight" in warnings[0]


def test_hub_revision_with_dots_never_reaches_the_hub(monkeypatch, tmp_path):
    import melt_core.checkpoints.hub as hub

    def no_download(*args, **kwargs):
        raise AssertionError("snapshot_download was called")

    monkeypatch.setattr(hub, "snapshot_download", no_download)
    for revision in ("../../../tmp", "main/../..", "v1..v2", "/etc"):
        line = _refused(["info", f"owner/name@{revision}"], tmp_path)
        assert f"revision {revision!r} is not a branch, tag or commit hash" in line


# --- a sweep of hostile inputs (issue 21) ---


def test_force_never_deletes_the_current_folder(melt_ckpt, text_file, tmp_path, monkeypatch):
    """`--out ''` is `.`: with --force it wiped the folder the user stood in."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "precious.txt").write_text("keep me")
    for out in ["", ".", str(tmp_path.parent)]:
        result = runner.invoke(app, ["transition", str(melt_ckpt), "--data", str(text_file), "--out", out, "--force"])
        assert "--force would delete" in one_red_line(result)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_environment_threads_that_are_not_a_number(tiny_ckpt, monkeypatch):
    monkeypatch.setenv("MELT_THREADS", "abc")
    assert "MELT_THREADS must be a whole number" in one_red_line(runner.invoke(app, ["info", str(tiny_ckpt)]))


def test_sliding_window_configs_are_refused(tiny_ckpt, tmp_path):
    ckpt = tmp_path / "sw"
    shutil.copytree(tiny_ckpt, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    for extra, expected in [
        ({"use_sliding_window": True, "sliding_window": 16}, "use_sliding_window"),
        ({"layer_types": ["sliding_attention"] * config["num_hidden_layers"]}, "layer_types"),
        ({"layer_types": "full_attention"}, "layer_types"),
    ]:
        (ckpt / "config.json").write_text(json.dumps({**config, **extra}))
        assert expected in one_red_line(runner.invoke(app, ["info", str(ckpt)]))


def test_out_of_memory_is_one_line(tiny_ckpt, monkeypatch):
    import melt_cli.commands.info as info

    def too_big(path):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:119] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(info, "summarize_checkpoint", too_big)
    assert "out of memory" in one_red_line(runner.invoke(app, ["info", str(tiny_ckpt)]))


def _handles(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (its SigCgt mask)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(mask, 16) & (1 << (signum - 1)))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads signal masks from /proc (Linux)")
def test_sigterm_outside_training_leaves_nothing_behind(tmp_path):
    """A SIGTERM during `melt data reasoning` ends with one line and exit 143; the temporary file is
    removed, and one a SIGKILL leaves is removed by the next run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "p.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "melt_cli", "data", "reasoning", "--out", str(out), "--n", "2000000"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while not _handles(proc.pid, signal.SIGTERM):  # melt's handler is installed (Linux: /proc)
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "terminated (SIGTERM)" in stderr and "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    (tmp_path / ".p.jsonl.tmp-999999999").write_text("left by a killed run")
    done = runner.invoke(app, ["data", "reasoning", "--out", str(out), "--n", "10"])
    assert done.exit_code == 0, done.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]
