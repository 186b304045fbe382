"""Greedy decoding and prefill of a left-padded batch through melt's inference engine (for tests)."""

from __future__ import annotations

import torch
from torch import Tensor

from melt_core.inference import Sampler, SamplingSettings
from melt_core.inference.engine import Engine, EngineOptions, ExitAtLoop, ExitThreshold


def engine(
    model,
    *,
    loops: int | None = None,
    chunk_size: int | None = None,
    depth=None,
    exit_at_step: int | None = None,
    exit_threshold: float | None | str = "config",
    decode: str = "eager",
    kv_dtype=None,
) -> Engine:
    """An engine with the options named as the model's forward names them."""
    if depth is not None:
        exit = depth
    elif exit_at_step is not None:
        exit = ExitAtLoop(exit_at_step)
    else:
        exit = ExitThreshold(exit_threshold)
    options = EngineOptions(loops=loops, exit=exit, chunk_size=chunk_size, kv_dtype=kv_dtype, decode=decode)
    return Engine(model, options)


@torch.no_grad()
def greedy_tokens(
    model, input_ids: Tensor, attention_mask: Tensor | None = None, *, max_new_tokens: int, **options
) -> Tensor:
    """(B, max_new_tokens) greedy tokens, no stop tokens, through a fresh cache; ``options`` as ``engine``."""
    runner = engine(model, **options)
    B, S = input_ids.shape
    cache = runner.new_cache(B, S + max_new_tokens)
    steps = runner.generate(cache, input_ids, attention_mask, Sampler(SamplingSettings()), max_new_tokens)
    return torch.stack(list(steps), dim=1)


@torch.no_grad()
def prefill_logits(model, input_ids: Tensor, attention_mask: Tensor | None, cache, **options) -> Tensor:
    """Every position's logits (B, S, V) of the prompt fed through ``cache`` by the engine (chunks
    aligned to the prompt's end); ``options`` as ``engine``."""
    return engine(model, **options).prefill(cache, input_ids, attention_mask, all_positions=True)
