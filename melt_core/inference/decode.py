"""Incremental inference over a model's own KV cache: chunked prefill, then one token at a time.

The models own no generation logic: this module feeds them prompt chunks and then one token at a
time through an explicit cache (``model.new_cache``), and picks each next token with a ``Sampler``.
Text, stop strings and statistics live one level up, in ``inference.generate``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InvalidArgumentError
from ..models import KVCache, is_melt
from ..models.chunks import ChunkAlign, chunk_lengths
from .sampling import Sampler
from .static_decode import StaticDecoder


def default_chunk_size(model: nn.Module) -> int | None:
    """Prefill chunk size when none is given: MELT's trained chunk size; Ouro: the whole prompt
    (Ouro is chunk-size invariant, so chunking it only bounds activation memory)."""
    return model.config.melt.chunk_size if is_melt(model) else None


@torch.no_grad()
def prefill(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    cache: KVCache,
    chunk_size: int | None = None,
    *,
    align: ChunkAlign = "start",
    last_only: bool = False,
    per_loop: bool = False,
    static: StaticDecoder | None = None,
    **forward_kwargs: object,
) -> Tensor | list[Tensor]:
    """Feed ``input_ids`` (B, S) through ``cache`` chunk by chunk; return the logits of every
    position (B, S, V), or with ``last_only`` of the last position only (B, V) — no (B, S, V)
    tensor is then ever built. ``per_loop`` (with ``last_only``): every loop's logits of the last
    position, T x (B, V).

    ``chunk_size`` None means ``default_chunk_size(model)``. Each chunk is one forward call; a MELT
    model is told that the slice is a single chunk. ``static`` (with ``last_only``, over ``cache``):
    the chunks of exactly ``chunk_size`` tokens run as its fixed-shape steps (one shape for any
    prompt length); the rest, and a whole prompt taken as one chunk, as ordinary forwards.
    """
    if per_loop and not last_only:
        raise InvalidArgumentError("prefill returns per-loop logits of the last position only (last_only=True)")
    if static is not None and (per_loop or not last_only):
        raise InvalidArgumentError("a static prefill returns the last position's logits only (last_only=True)")
    chunk_size = default_chunk_size(model) if chunk_size is None else chunk_size
    outputs, start = [], 0
    sizes = chunk_lengths(input_ids.shape[1], chunk_size, align)
    for size in sizes:
        end = start + size
        mask = None if attention_mask is None else attention_mask[:, start:end]
        if static is not None and len(sizes) > 1 and size == chunk_size:
            logits = static(input_ids[:, start:end], mask)
            start = end
            continue
        logits = None
        kwargs = dict(forward_kwargs)
        if is_melt(model):
            kwargs["chunk_size"] = size
        if last_only:
            kwargs["num_logits_to_keep"] = 1
        if per_loop:
            kwargs["return_loop_logits"] = True
        outputs.append(model(input_ids[:, start:end], mask, cache=cache, **kwargs))
        start = end
    if logits is not None:  # the last chunk ran as a static step
        return logits
    if per_loop:
        return [loop_logits[:, -1] for loop_logits in outputs[-1].loop_logits]
    return outputs[-1].logits[:, -1] if last_only else torch.cat([o.logits for o in outputs], dim=1)


@torch.no_grad()
def decode(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    cache: KVCache,
    sampler: Sampler,
    *,
    max_new_tokens: int,
    chunk_size: int | None = None,
    align: ChunkAlign = "end",
    static: bool | StaticDecoder | None = False,
    compile: bool = False,
    **forward_kwargs: Any,
) -> Iterator[Tensor]:
    """Prefill the left-padded prompt batch, then yield the next token of every row, (B,), once per
    step; each yielded token is fed back as a one-token forward before the next is yielded.

    ``forward_kwargs`` (``loops``, ``exit_at_step``, ``exit_threshold``, ``depth``) go to every
    forward. ``static``: decode steps and full prefill chunks at fixed shapes (a ``StaticDecoder``
    over ``cache``, or True to build one; float-row caches, no adaptive depth; None / False:
    ordinary forwards), ``compile``: compiled too. Stop early by closing the generator
    (``break``); rows that are finished keep being fed their own tokens, which never affects the
    other rows.
    """
    if (static or compile) and forward_kwargs.get("depth") is not None:
        raise InvalidArgumentError("adaptive depth changes the work per row: it runs without static= / compile=")
    fixed = static if isinstance(static, StaticDecoder) else None
    if fixed is None and (static or compile):
        kwargs = {k: v for k, v in forward_kwargs.items() if k != "depth"}
        fixed = StaticDecoder(model, cache, compile=compile, **kwargs)
    logits = prefill(
        model, input_ids, attention_mask, cache, chunk_size, align=align, last_only=True, static=fixed, **forward_kwargs
    )
    for step in range(max_new_tokens):
        next_ids = sampler(logits, input_ids)  # (B,)
        yield next_ids
        if step + 1 < max_new_tokens:
            if fixed is not None:
                logits = fixed(next_ids[:, None])
            else:
                logits = model(next_ids[:, None], cache=cache, **forward_kwargs).logits[:, -1]
