"""Hugging Face Hub model ids as checkpoints, fully offline: a Hub cache laid out in tmp_path."""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path
from unittest.mock import Mock

import pytest
import torch
from cli_helpers import one_red_line
from huggingface_hub import constants
from huggingface_hub.errors import RepositoryNotFoundError
from typer.testing import CliRunner

from melt_cli.app import app
from melt_core import load_model
from melt_core.checkpoints import hub
from melt_core.checkpoints.builtin import resolve
from melt_core.checkpoints.tokenizer import load_tokenizer

runner = CliRunner()
MAIN, V1 = "a" * 40, "b" * 40


@pytest.fixture(autouse=True)
def offline_cache(tmp_path, monkeypatch) -> Path:
    """Every test: offline, with an empty Hub cache of its own. huggingface_hub reads the
    environment into ``constants`` at import time and the constants at call time, so patch both."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    for name, value in (("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def add_snapshot(cache: Path, repo: str, commit: str, ckpt: Path, ref: str | None = "main") -> None:
    """``ckpt`` as the snapshot ``commit`` of model ``repo`` (plain files, no blobs/), named by ``ref``."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(ckpt, folder / "snapshots" / commit)
    if ref is not None:
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / ref).write_text(commit)


@pytest.fixture
def cached(offline_cache, tiny_ckpt, mha_ckpt) -> Path:
    """owner/name in the cache: tiny_ckpt at main, mha_ckpt at tag v1."""
    add_snapshot(offline_cache, "owner/name", MAIN, tiny_ckpt)
    add_snapshot(offline_cache, "owner/name", V1, mha_ckpt, ref="v1")
    return offline_cache


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_offline_in_every_test():
    assert constants.HF_HUB_OFFLINE and "hub-cache" in constants.HF_HUB_CACHE


@pytest.mark.parametrize(
    "text", ["owner/name", "ByteDance/Ouro-1.4B", "a_b/c.d-e", "owner/name@v1", "owner/name@refs/pr/1"]
)
def test_is_hub_id(text):
    assert hub.is_hub_id(text)


@pytest.mark.parametrize(
    "text",
    ["example", "/abs/dir", "./owner/name", "../owner/name", "~/owner", "a/b/c", "owner/", "/name",
     "owner/na me", "own--er/name", "owner/name@", "owner/name@a b", "owner/name.git", ""],
)  # fmt: skip
def test_is_not_hub_id(text):
    assert not hub.is_hub_id(text)


def test_existing_local_path_wins(cached, mha_ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(mha_ckpt, tmp_path / "owner" / "name")
    assert not hub.is_hub_id("owner/name")
    assert resolve("owner/name") == Path("owner/name")


def test_load_model_and_tokenizer_by_id(cached, tiny_ckpt):
    assert resolve("owner/name") == cached / "models--owner--name" / "snapshots" / MAIN
    assert same_weights(load_model("owner/name"), load_model(tiny_ckpt))
    text = "Looped language models reuse their layers."
    assert load_tokenizer("owner/name").encode(text) == load_tokenizer(tiny_ckpt).encode(text)


@pytest.mark.parametrize("revision", ["v1", V1])
def test_revision(cached, mha_ckpt, revision):
    assert resolve(f"owner/name@{revision}").name == V1
    assert same_weights(load_model(f"owner/name@{revision}"), load_model(mha_ckpt))


def test_cli_info_and_convert_by_id(cached, tiny_ckpt, tmp_path):
    result = runner.invoke(app, ["info", "owner/name", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == json.loads(runner.invoke(app, ["info", str(tiny_ckpt), "--json"]).stdout) | {
        "path": str(cached / "models--owner--name" / "snapshots" / MAIN)
    }
    result = runner.invoke(app, ["convert", "owner/name", str(tmp_path / "melt")])
    assert result.exit_code == 0, result.output
    assert load_model(tmp_path / "melt").config.model_type == "melt"


def test_not_in_cache_offline_is_one_line(cached):
    line = one_red_line(runner.invoke(app, ["info", "other/model"]))
    assert "other/model" in line and "Hub cache" in line and "HF_HUB_OFFLINE" in line
    line = one_red_line(runner.invoke(app, ["info", "owner/name@v2"]))
    assert "owner/name@v2" in line


def test_missing_relative_path_is_still_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = one_red_line(runner.invoke(app, ["convert", "runs/x", "out"]))
    assert "runs/x" in line and "local directory" in line
    assert not (tmp_path / "out").exists()


def test_unknown_repo_is_one_line(monkeypatch):
    def not_found(*args, **kwargs):
        raise RepositoryNotFoundError("404 Client Error", response=Mock(status_code=404, headers={}))

    monkeypatch.setattr(hub, "snapshot_download", not_found)
    line = one_red_line(runner.invoke(app, ["info", "nobody/nothing"]))
    assert "nobody/nothing" in line and "neither a local directory nor a model on the Hugging Face Hub" in line


def test_downloads_only_checkpoint_files(monkeypatch, tmp_path):
    calls = []

    def fake(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tmp_path)

    monkeypatch.setattr(hub, "snapshot_download", fake)
    assert hub.resolve_hub_id("owner/name@v1") == tmp_path
    (repo_id, kwargs), *_ = calls
    assert repo_id == "owner/name" and kwargs.pop("revision") == "v1"
    assert set(kwargs) == {"allow_patterns"}  # nothing that overrides HF_HUB_CACHE / HF_HUB_OFFLINE

    def wanted(f: str) -> bool:
        return any(fnmatch.fnmatch(f, p) for p in kwargs["allow_patterns"])

    assert all(map(wanted, ["config.json", "model-00001-of-00002.safetensors", "tokenizer.json", "merges.txt"]))
    assert not any(map(wanted, ["modeling_ouro.py", "configuration_ouro.py", "README.md", "pytorch_model.bin"]))
