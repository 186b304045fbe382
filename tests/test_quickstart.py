"""The built-in example model and `melt quickstart` (short step counts)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from melt_cli.app import app
from melt_core import load_model, load_tokenizer
from melt_core.checkpoints.builtin import BUILTIN_CHECKPOINTS

runner = CliRunner()


def test_example_model_loads_by_name():
    model = load_model("example")
    assert model.config.model_type == "ouro" and model.config.total_ut_steps == 4
    assert len(load_tokenizer("example")) == model.config.vocab_size
    info = json.loads(runner.invoke(app, ["info", "example", "--json"]).stdout)
    assert info["path"] == str(BUILTIN_CHECKPOINTS["example"]) and info["has_weights"]
    assert 1_000_000 < info["num_parameters"] < 20_000_000


def test_quickstart_runs_every_stage(tmp_path):
    out = tmp_path / "qs"
    result = runner.invoke(
        app,
        [
            "quickstart",
            "--out",
            str(out),
            "--steps1",
            "2",
            "--steps2",
            "2",
            "--seq-len",
            "64",
            "--batch-tokens",
            "64",
            "--eval-sequences",
            "2",
            "--reasoning-steps1",
            "2",
            "--reasoning-steps2",
            "2",
            "--reasoning-problems",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    for text in ("Ouro teacher", "MELT (phase 1 + 2)", "training-free last", "perplexity", "Ouro B/token", "16x"):
        assert text in result.stdout, text
    assert (out / "phase2" / "config.json").is_file() and (out / "melt-last" / "config.json").is_file()
    assert "Multi-hop reasoning" in result.stdout and "KV B/token" in result.stdout
    assert (out / "reasoning" / "phase2" / "config.json").is_file()
    again = runner.invoke(app, ["quickstart", "--out", str(out)])
    assert again.exit_code == 1 and "--force" in again.stderr
