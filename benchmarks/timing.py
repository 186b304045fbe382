"""What the benchmark scripts share: the time of a greedy decode's steps, prefill excluded."""

from __future__ import annotations

import time
from typing import Any

import torch

from melt_core.inference import Sampler, SamplingSettings
from melt_core.inference.decode import decode
from melt_core.inference.static_decode import StaticDecoder
from melt_core.runtime import synchronize


@torch.no_grad()
def decode_step_seconds(
    model, ids: torch.Tensor, new_tokens: int, loops: int | None = None, fuse: bool = True, **decode_kwargs: Any
) -> float:
    """Seconds per decode step of greedy decoding after the prompt ``ids`` (B, S): the mean over the
    ``new_tokens - 1`` one-token steps (the first new token comes from the prefill, not timed).
    ``fuse=False`` with ``compile``: the compiled step without fused projections."""
    cache = model.new_cache(ids.shape[0], ids.shape[1] + new_tokens, loops)
    if not fuse and decode_kwargs.pop("compile", False):
        decode_kwargs["static"] = StaticDecoder(model, cache, loops=loops, compile=True, fuse=False)
    sampler = Sampler(SamplingSettings())
    steps = decode(model, ids, None, cache, sampler, max_new_tokens=new_tokens, loops=loops, **decode_kwargs)
    next(steps)
    synchronize(model.device)
    start = time.perf_counter()
    for _ in steps:
        pass
    synchronize(model.device)
    return (time.perf_counter() - start) / (new_tokens - 1)
