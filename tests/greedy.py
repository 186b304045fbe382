"""Greedy decoding of a left-padded batch through melt's own decode loop (for tests)."""

from __future__ import annotations

import torch
from torch import Tensor

from melt_core.inference import Sampler, SamplingSettings
from melt_core.inference.decode import decode


@torch.no_grad()
def greedy_tokens(
    model,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    max_new_tokens: int,
    loops: int | None = None,
    chunk_size: int | None = None,
    **forward_kwargs,
) -> Tensor:
    """(B, max_new_tokens) greedy tokens, no stop tokens, through ``model.new_cache``;
    ``forward_kwargs`` (e.g. ``depth``) go to every forward."""
    B, S = input_ids.shape
    cache = model.new_cache(B, S + max_new_tokens, loops)
    steps = decode(
        model,
        input_ids,
        attention_mask,
        cache,
        Sampler(SamplingSettings()),
        max_new_tokens=max_new_tokens,
        chunk_size=chunk_size,
        loops=loops,
        **forward_kwargs,
    )
    return torch.stack(list(steps), dim=1)
