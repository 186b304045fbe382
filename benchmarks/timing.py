"""What the benchmark scripts share: the time of a greedy decode's steps, prefill excluded, and the
weight bytes a decode step reads (the numerator of the bandwidth floor)."""

from __future__ import annotations

import time
from typing import Any

import torch

from melt_core.inference import Sampler, SamplingSettings
from melt_core.inference.decode import decode
from melt_core.inference.static_decode import StaticDecoder
from melt_core.runtime import synchronize


def step_weight_bytes(model, loops: int) -> int:
    """Weight bytes one decode step reads: the layers once per loop, the rest (norm, exit gate, LM
    head) once, of the embedding one row."""
    layers = sum(p.nbytes for name, p in model.named_parameters() if name.startswith("model.layers."))
    embedding = model.model.embed_tokens.weight
    rest = sum(p.nbytes for p in model.parameters()) - layers - embedding.nbytes
    return layers * loops + rest + embedding[0].nbytes


@torch.no_grad()
def decode_step_seconds(
    model, ids: torch.Tensor, new_tokens: int, loops: int | None = None, fuse: bool | None = None, **decode_kwargs: Any
) -> float:
    """Seconds per decode step of greedy decoding after the prompt ``ids`` (B, S): the mean over the
    ``new_tokens - 1`` one-token steps (the first new token comes from the prefill, not timed).
    ``fuse`` with ``compile``: the compiled step with (True) or without (False) fused projections
    (None: ``StaticDecoder``'s default)."""
    cache = model.new_cache(ids.shape[0], ids.shape[1] + new_tokens, loops)
    if decode_kwargs.pop("compile", False):
        decode_kwargs["static"] = StaticDecoder(model, cache, loops=loops, compile=True, fuse=fuse)
    sampler = Sampler(SamplingSettings())
    steps = decode(model, ids, None, cache, sampler, max_new_tokens=new_tokens, loops=loops, **decode_kwargs)
    next(steps)
    synchronize(model.device)
    start = time.perf_counter()
    for _ in steps:
        pass
    synchronize(model.device)
    return (time.perf_counter() - start) / (new_tokens - 1)
