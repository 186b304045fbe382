"""Small random Ouro checkpoints in the exact Hugging Face format (tests, sizing, pretraining)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..dtypes import dtype_name, parse_dtype
from ..models import OuroConfig, OuroForCausalLM
from .io import save_checkpoint
from .tokenizer import SAMPLE_TEXT, train_bpe_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# Shapes of the random "tiny" model (a few hundred thousand parameters).
TINY_SHAPE: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "total_ut_steps": 4,
    "max_position_embeddings": 2048,
}


def init_weights(model: OuroForCausalLM, seed: int, std: float = 0.02) -> None:
    """Normal(0, std) for matrices and embeddings, ones for norms, zero exit-gate bias."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        with torch.no_grad():
            if name.endswith("layernorm.weight") or name.endswith("layernorm_2.weight") or name == "model.norm.weight":
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def ouro_config_for(tokenizer: PreTrainedTokenizerFast, dtype: torch.dtype, **shape: Any) -> OuroConfig:
    """An Ouro config with real-checkpoint keys, sized by ``shape`` and the tokenizer's vocabulary."""
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return OuroConfig(
        vocab_size=len(tokenizer),
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        torch_dtype=dtype_name(dtype),
        extra={
            "use_cache": True,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": shape.get("num_hidden_layers", 24),
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "layer_types": ["full_attention"] * shape.get("num_hidden_layers", 24),
        },
        **shape,
    )


def write_random_ouro(
    out: str | os.PathLike,
    *,
    seed: int = 0,
    dtype: str | torch.dtype = "fp32",
    vocab_size: int = 512,
    tokenizer: PreTrainedTokenizerFast | None = None,
    force: bool = False,
    **shape: Any,
) -> Path:
    """Write a random Ouro checkpoint to ``out``: config.json, model.safetensors, tokenizer files,
    generation_config.json. ``shape`` overrides ``TINY_SHAPE`` (hidden_size, num_hidden_layers, ...).
    Without a tokenizer, a byte-level BPE of ``vocab_size`` is trained on melt's sample text."""
    dtype = parse_dtype(dtype)
    if tokenizer is None:
        tokenizer = train_bpe_tokenizer([SAMPLE_TEXT.read_text()], vocab_size)
    config = ouro_config_for(tokenizer, dtype, **{**TINY_SHAPE, **shape})
    model = OuroForCausalLM(config)
    init_weights(model, seed)
    return save_checkpoint(model.to(dtype), out, tokenizer=tokenizer, force=force)
