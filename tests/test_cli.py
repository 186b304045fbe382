"""The CLI skeleton: help, version, info, and one red line per bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from cli_helpers import one_red_line
from typer.testing import CliRunner

from melt_cli.app import app
from melt_core import __version__
from melt_core.checkpoints.io import WEIGHTS_NAME

runner = CliRunner()


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("info", "random-model"):
        assert cmd in result.stdout


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.stdout


def test_info_table_and_json(tiny_ckpt):
    result = runner.invoke(app, ["info", str(tiny_ckpt)])
    assert result.exit_code == 0, result.output
    assert "ouro" in result.stdout and "KV cache per token" in result.stdout
    info = json.loads(runner.invoke(app, ["info", str(tiny_ckpt), "--json"]).stdout)
    # 3 layers x 4 loops x 2 (K, V) x 2 kv heads x 8 head dim x 4 bytes
    assert info["kv_bytes_per_token"] == 3 * 4 * 2 * 2 * 8 * 4
    assert info["dtype"] == "float32" and info["has_weights"] is True
    assert info["weights_bytes"] == info["num_parameters"] * 4


def test_random_model_command(tmp_path):
    out = tmp_path / "r"
    result = runner.invoke(
        app,
        [
            "random-model",
            str(out),
            "--layers",
            "1",
            "--hidden",
            "32",
            "--heads",
            "2",
            "--kv-heads",
            "1",
            "--vocab-size",
            "300",
        ],
    )
    assert result.exit_code == 0, result.output
    info = json.loads(runner.invoke(app, ["info", str(out), "--json"]).stdout)
    assert info["num_layers"] == 1 and info["num_key_value_heads"] == 1 and info["vocab_size"] == 300
    again = runner.invoke(app, ["random-model", str(out)])
    assert again.exit_code == 1 and "--force" in again.stderr


@pytest.mark.parametrize("case", ["missing_dir", "no_config", "not_ouro", "shape", "truncated"])
def test_info_errors_are_one_line(tiny_ckpt, tmp_path, case):
    src = tmp_path / "ckpt"
    if case != "missing_dir":
        shutil.copytree(tiny_ckpt, src)
    if case == "no_config":
        (src / "config.json").unlink()
    elif case == "not_ouro":
        cfg = json.loads((src / "config.json").read_text())
        cfg["model_type"] = "qwen3"
        (src / "config.json").write_text(json.dumps(cfg))
    elif case == "truncated":
        data = (src / WEIGHTS_NAME).read_bytes()
        (src / WEIGHTS_NAME).write_bytes(data[:100])
    elif case == "shape":
        cfg = json.loads((src / "config.json").read_text())
        cfg["vocab_size"] += 1
        (src / "config.json").write_text(json.dumps(cfg))
    line = one_red_line(runner.invoke(app, ["info", str(src)]))
    expected = {
        "missing_dir": "does not exist",
        "no_config": "config.json not found",
        "not_ouro": "model_type 'qwen3'",
        "truncated": "truncated or corrupt",
        "shape": "has shape",
    }[case]
    assert expected in line and str(src) in line


def test_debug_env_shows_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("MELT_DEBUG", "1")
    result = runner.invoke(app, ["info", str(tmp_path / "nope")])
    assert result.exit_code != 0
    from melt_core.errors import CheckpointNotFoundError

    assert isinstance(result.exception, CheckpointNotFoundError)


def test_default_threads_leave_busy_cores_alone(monkeypatch):
    import melt_core.runtime as runtime

    monkeypatch.delenv("MELT_THREADS", raising=False)
    monkeypatch.setattr(runtime, "TORCH_DEFAULT_THREADS", 8)
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (2.6, 1.0, 1.0))
    assert runtime.default_threads() == 5  # 8 cores, about 3 busy
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert runtime.default_threads() == 2  # shared by 2 processes of a launch
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (30.0, 1.0, 1.0))
    assert runtime.default_threads() == 1
    monkeypatch.setenv("MELT_THREADS", "3")
    assert runtime.default_threads() == 3


def _commands(group, path=()):
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


def test_one_device_and_dtype_vocabulary():
    """Every command that places or loads a model takes --device (default auto) and --dtype (default
    auto: the stored dtype), and the same spellings are accepted everywhere (--kv-dtype too)."""
    import typer.main

    from melt_core.cache.quantized import kv_format

    root = typer.main.get_command(app)
    devices, dtypes = {}, {}
    for path, command in _commands(root):
        for param in command.params:
            if param.name == "device":
                devices[" ".join(path)] = param.default
            if param.name == "dtype" and path != ("random-model",):  # a new model has no stored dtype
                dtypes[" ".join(path)] = param.default
            assert param.name != "cpu", f"melt {' '.join(path)} still has --cpu"
    assert {"generate", "eval text", "eval problems", "eval tasks", "transition", "distill", "pretrain"} <= set(devices)
    assert set(devices.values()) == {"auto"}, devices
    assert set(dtypes.values()) == {"auto"}, dtypes
    assert kv_format("bfloat16").dtype == kv_format("bf16").dtype == torch.bfloat16
