"""Tiny random Ouro checkpoints in the exact HF format, shared by the tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from melt_core import load_model
from melt_core.checkpoints.random_model import write_random_ouro
from melt_core.checkpoints.tokenizer import SAMPLE_TEXT, train_bpe_tokenizer

# Tiny models run fastest on one thread, and far faster than with two when another process holds a core
# (the CLI's default thread count reads MELT_THREADS).
torch.set_num_threads(1)
os.environ["MELT_THREADS"] = "1"

# MHA and GQA variants; small enough that a forward takes milliseconds.
TINY_MHA = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    total_ut_steps=3,
)
TINY_GQA = dict(
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    total_ut_steps=4,
)


@pytest.fixture(autouse=True)
def _token_cache(tmp_path_factory, monkeypatch):
    """Tokenised data is cached under a per-session temporary directory, never in ~/.cache."""
    monkeypatch.setenv("MELT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "melt-cache"))


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """melt's sample text as a JSONL corpus of several documents."""
    import json

    paragraphs = [p for p in SAMPLE_TEXT.read_text().split("\n\n") if p.strip()]
    path = tmp_path_factory.mktemp("data") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    return path


@pytest.fixture(scope="session")
def tokenizer():
    return train_bpe_tokenizer([SAMPLE_TEXT.read_text()], 384)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tokenizer) -> Path:
    """A random GQA Ouro checkpoint (fp32) on disk."""
    return write_random_ouro(tmp_path_factory.mktemp("ckpt") / "tiny-ouro", tokenizer=tokenizer, seed=1, **TINY_GQA)


@pytest.fixture(scope="session")
def mha_ckpt(tmp_path_factory, tokenizer) -> Path:
    return write_random_ouro(tmp_path_factory.mktemp("ckpt") / "mha-ouro", tokenizer=tokenizer, seed=2, **TINY_MHA)


@pytest.fixture(params=["tiny_ckpt", "mha_ckpt"])
def ckpt(request) -> Path:
    return request.getfixturevalue(request.param)


@pytest.fixture
def model(ckpt):
    torch.manual_seed(0)
    return load_model(ckpt, dtype="fp32")


@pytest.fixture(scope="session")
def melt_ckpt(tiny_ckpt, tmp_path_factory) -> Path:
    """The tiny Ouro checkpoint converted to MELT (chunk size 4), with token-dependent gates
    (normal, std 0.3; a fresh conversion starts at W = U = 0), saved: the shared MELT checkpoint."""
    from melt_core import save_checkpoint
    from melt_core.checkpoints import convert_ouro_to_melt
    from melt_core.models import MeltSettings

    root = tmp_path_factory.mktemp("melt")
    converted = load_model(convert_ouro_to_melt(tiny_ckpt, root / "converted", MeltSettings(chunk_size=4)))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in converted.gate_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return save_checkpoint(converted, root / "melt", tokenizer=tiny_ckpt)
