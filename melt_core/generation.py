"""Incremental inference over a model's own KV cache: chunked prefill and greedy decoding."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import InvalidArgumentError


@torch.no_grad()
def prefill(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, cache: object,
            chunk_size: int | None = None, **forward_kwargs: object) -> Tensor:
    """Feed ``input_ids`` (B, S) through ``cache`` in chunks of ``chunk_size`` tokens (default:
    all at once); returns the logits of every position (B, S, V)."""
    S = input_ids.shape[1]
    chunk_size = S if chunk_size is None else chunk_size
    if chunk_size < 1:
        raise InvalidArgumentError(f"chunk size must be >= 1, got {chunk_size}")
    logits = []
    for start in range(0, S, chunk_size):
        end = min(start + chunk_size, S)
        mask = None if attention_mask is None else attention_mask[:, start:end]
        logits.append(model(input_ids[:, start:end], mask, cache=cache, **forward_kwargs).logits)
    return torch.cat(logits, dim=1)


@dataclass
class GreedyResult:
    tokens: Tensor  # (B, n) generated ids; rows that stopped early are filled with their stop id
    num_generated: list[int]  # per row, including the stop token


@torch.no_grad()
def greedy_generate(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                    max_new_tokens: int, loops: int | None = None, stop_token_ids: tuple[int, ...] = (),
                    chunk_size: int | None = None) -> GreedyResult:
    """Greedy decoding of a left-padded batch through the model's own cache (``model.new_cache``)."""
    B, S = input_ids.shape
    cache = model.new_cache(B, S + max_new_tokens, loops)
    logits = prefill(model, input_ids, attention_mask, cache, chunk_size, loops=loops)[:, -1]
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    counts = [0] * B
    stop = torch.tensor(stop_token_ids, dtype=torch.long, device=input_ids.device)
    out = []
    for _ in range(max_new_tokens):
        next_ids = logits.argmax(-1)  # (B,)
        next_ids = torch.where(done, out[-1] if out else next_ids, next_ids)
        for b in range(B):
            counts[b] += int(not done[b])
        out.append(next_ids)
        done = done | torch.isin(next_ids, stop)
        if bool(done.all()):
            break
        logits = model(next_ids[:, None], cache=cache, loops=loops).logits[:, -1]
    return GreedyResult(torch.stack(out, dim=1), counts)
