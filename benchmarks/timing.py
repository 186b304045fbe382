"""What the benchmark scripts share: the time of a greedy decode's steps, prefill excluded, and the
weight bytes a decode step reads (the numerator of the bandwidth floor)."""

from __future__ import annotations

import time

import torch

from melt_core.inference import Sampler, SamplingSettings
from melt_core.inference.engine import Engine, EngineOptions
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
    model,
    ids: torch.Tensor,
    new_tokens: int,
    loops: int | None = None,
    decode: str = "eager",
    fuse: bool | None = None,
    depth=None,
) -> float:
    """Seconds per decode step of greedy decoding after the prompt ``ids`` (B, S): the mean over the
    last ``new_tokens - 2`` one-token steps (the first new token comes from the prefill, the first
    step may compile or capture its shape: neither is timed; ``new_tokens`` >= 3), on
    the engine's ``decode`` path. ``fuse`` (fixed-shape paths): with (True) or without (False) fused
    projections (None: the engine's default, CUDA only). ``depth``: MELT's adaptive depth (eager)."""
    exit = {} if depth is None else {"exit": depth}
    engine = Engine(model, EngineOptions(loops=loops, decode=decode, fuse=fuse, **exit))
    cache = engine.new_cache(ids.shape[0], ids.shape[1] + new_tokens)
    steps = engine.generate(cache, ids, None, Sampler(SamplingSettings()), new_tokens)
    next(steps)  # the prefill's token
    next(steps)  # the first decode step: a fixed shape's compilation or CUDA-graph capture
    synchronize(model.device)
    start = time.perf_counter()
    count = sum(1 for _ in steps)
    synchronize(model.device)
    return (time.perf_counter() - start) / count
