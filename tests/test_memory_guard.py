"""Allocations melt can size in advance (weights, KV cache, a model's modules) are refused, as one
line naming the size, the memory available and the options that size them, before they are made."""

from __future__ import annotations

import pytest
from cli_helpers import one_red_line
from typer.testing import CliRunner

import melt_core.runtime as runtime
from melt_cli.app import app
from melt_core import load_model, load_tokenizer
from melt_core.checkpoints import build_model, load_config
from melt_core.errors import NotEnoughMemoryError
from melt_core.inference import GenerationSettings
from melt_core.inference.generate import generate_text
from melt_core.runtime import available_memory, check_fits, human_bytes

runner = CliRunner()
GiB = 1024**3


def test_available_memory_of_the_cpu_is_known():
    assert available_memory("cpu") > 0
    assert available_memory("meta") is None


def test_check_fits_names_size_memory_and_flags(monkeypatch):
    monkeypatch.setattr(runtime, "available_memory", lambda device: 2 * GiB)
    check_fits(2 * GiB, "cpu", "a cache")
    with pytest.raises(NotEnoughMemoryError) as e:
        check_fits(3 * GiB, "cpu", "the KV cache", "--loops or --batch-size")
    assert str(e.value) == (
        "the KV cache needs 3.00 GiB, but only 2.00 GiB of memory is available on cpu; lower --loops or --batch-size"
    )


def test_unknown_memory_is_not_refused(monkeypatch):
    monkeypatch.setattr(runtime, "available_memory", lambda device: None)
    check_fits(10**18, "cpu", "anything")


def test_human_bytes():
    assert human_bytes(512) == "512 B" and human_bytes(1536) == "1.50 KiB" and human_bytes(3 * 1024**5) == "3.00 PiB"


def test_weights_that_do_not_fit_are_refused_before_reading(tiny_ckpt, monkeypatch):
    monkeypatch.setattr(runtime, "available_memory", lambda device: 300 * 1024)  # the weights take 380 KiB
    with pytest.raises(NotEnoughMemoryError, match=r"the weights of .*tiny-ouro \(97,441 parameters in float32\)"):
        load_model(tiny_ckpt)
    assert load_model(tiny_ckpt, device="meta").lm_head.weight.is_meta  # sizing needs no memory


def test_a_model_too_deep_to_build_even_on_meta(tiny_ckpt):
    config = load_config(tiny_ckpt)
    config.num_hidden_layers = 10**9
    with pytest.raises(NotEnoughMemoryError, match="building a model of 1,000,000,000 layers needs"):
        build_model(config, "meta")


@pytest.mark.parametrize(("ckpt", "flags"), [("tiny_ckpt", "--loops, --max-new-tokens"), ("melt_ckpt", "lower --max")])
def test_kv_cache_is_checked_before_it_is_allocated(ckpt, flags, request, monkeypatch):
    """MELT's cache does not grow with the loops: --loops is not offered as a remedy."""
    model = load_model(request.getfixturevalue(ckpt))
    tokenizer = load_tokenizer(request.getfixturevalue(ckpt))
    monkeypatch.setattr(runtime, "available_memory", lambda device: 10_000)
    with pytest.raises(NotEnoughMemoryError, match=f"the KV cache .* needs .*{flags}"):
        generate_text(model, tokenizer, ["hi"], GenerationSettings(max_new_tokens=64, loops=8))


def test_cli_kv_cache_refusal_names_the_flags(tiny_ckpt, monkeypatch):
    monkeypatch.setattr(runtime, "available_memory", lambda device: 5 * 1024**2)
    args = ["generate", str(tiny_ckpt), "-p", "hi", "--loops", "100", "--max-new-tokens", "200"]
    line = one_red_line(runner.invoke(app, args))
    assert "the KV cache (100 loops, 1 row of 201 positions) needs 7.36 MiB" in line  # 384 B per token and loop
    assert "5.00 MiB of memory is available on cpu; lower --loops, --max-new-tokens or --batch-size" in line
