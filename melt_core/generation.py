"""Incremental inference over a model's own KV cache: chunked prefill, token choice, decoding.

The models own no generation logic: this module feeds them prompt chunks and then one token at a
time through an explicit cache (``model.new_cache``), and picks each next token from the logits
(greedy, or sampled through transformers' logits warpers with a seeded ``torch.Generator``).
Text, stop strings and statistics live one level up, in ``melt_core.inference``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from .errors import InvalidArgumentError

ChunkAlign = Literal["start", "end"]


def is_melt(model: nn.Module) -> bool:
    """Whether ``model`` is a MELT model (its forward takes ``chunk_size``)."""
    return getattr(model.config, "model_type", None) == "melt"


def default_chunk_size(model: nn.Module) -> int | None:
    """Prefill chunk size when none is given: MELT's trained chunk size; Ouro: the whole prompt
    (Ouro is chunk-size invariant, so chunking it only bounds activation memory)."""
    return model.config.melt.chunk_size if is_melt(model) else None


def chunk_lengths(length: int, chunk_size: int | None, align: ChunkAlign = "start") -> list[int]:
    """Split ``length`` tokens into chunks of at most ``chunk_size`` (None: one chunk).

    ``start``: full chunks first, the remainder last (the training forward's chunking).
    ``end``: the remainder first, so that the last token closes a full chunk. Generation uses
    ``end``: left-padded rows of a batch then fall into exactly the chunks they get alone.
    """
    if chunk_size is not None and chunk_size < 1:
        raise InvalidArgumentError(f"chunk size must be >= 1, got {chunk_size}")
    if length < 1:
        raise InvalidArgumentError("nothing to prefill: the input has no tokens")
    if chunk_size is None or chunk_size >= length:
        return [length]
    sizes = [chunk_size] * (length // chunk_size)
    rest = length % chunk_size
    if rest:
        sizes = sizes + [rest] if align == "start" else [rest] + sizes
    return sizes


@torch.no_grad()
def prefill(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, cache: object,
            chunk_size: int | None = None, *, align: ChunkAlign = "start", last_only: bool = False,
            **forward_kwargs: object) -> Tensor:
    """Feed ``input_ids`` (B, S) through ``cache`` chunk by chunk; return the logits of every
    position (B, S, V), or with ``last_only`` of the last position only (B, V) — no (B, S, V)
    tensor is then ever built.

    ``chunk_size`` None means ``default_chunk_size(model)``. Each chunk is one forward call; a MELT
    model is told that the slice is a single chunk.
    """
    chunk_size = default_chunk_size(model) if chunk_size is None else chunk_size
    logits, start = [], 0
    for size in chunk_lengths(input_ids.shape[1], chunk_size, align):
        end = start + size
        mask = None if attention_mask is None else attention_mask[:, start:end]
        kwargs = dict(forward_kwargs)
        if is_melt(model):
            kwargs["chunk_size"] = size
        if last_only:
            kwargs["num_logits_to_keep"] = 1
        logits.append(model(input_ids[:, start:end], mask, cache=cache, **kwargs).logits)
        start = end
    return logits[-1][:, -1] if last_only else torch.cat(logits, dim=1)


@dataclass
class SamplingSettings:
    """How the next token is chosen: ``temperature`` 0 is greedy (argmax); above 0, the logits go
    through transformers' temperature, top-k (0 = off) and top-p (1 = off) warpers, in that order,
    and the token is drawn from the softmax with a ``torch.Generator`` seeded by ``seed``."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise InvalidArgumentError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise InvalidArgumentError(f"top-k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidArgumentError(f"top-p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.temperature == 0 and (self.top_k > 0 or self.top_p < 1.0):
            raise InvalidArgumentError("top-k / top-p apply to sampling: set a temperature > 0 (0 is greedy)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Picks the next token of every row from the last position's logits (B, V)."""

    def __init__(self, settings: SamplingSettings, device: torch.device | str = "cpu") -> None:
        self.settings = settings
        self.warpers = LogitsProcessorList()
        if not settings.greedy:
            if settings.temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(settings.temperature))
            if settings.top_k > 0:
                self.warpers.append(TopKLogitsWarper(settings.top_k))
            if settings.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(settings.top_p))
        self.generator = torch.Generator(device=device)
        if settings.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(settings.seed)

    def __call__(self, logits: Tensor, input_ids: Tensor) -> Tensor:
        """``logits`` (B, V), ``input_ids`` (B, S) the prompt (the warpers used ignore it) -> (B,)."""
        if self.settings.greedy:
            return logits.argmax(-1)
        scores = self.warpers(input_ids, logits.float())
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)


@torch.no_grad()
def decode(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, cache: object, sampler: Sampler, *,
           max_new_tokens: int, chunk_size: int | None = None, align: ChunkAlign = "end",
           **forward_kwargs: object) -> Iterator[Tensor]:
    """Prefill the left-padded prompt batch, then yield the next token of every row, (B,), once per
    step; each yielded token is fed back as a one-token forward before the next is yielded.

    ``forward_kwargs`` (``loops``, ``exit_at_step``, ``exit_threshold``) go to every forward.
    Stop early by closing the generator (``break``); rows that are finished keep being fed their
    own tokens, which never affects the other rows.
    """
    logits = prefill(model, input_ids, attention_mask, cache, chunk_size, align=align, last_only=True,
                     **forward_kwargs)
    for step in range(max_new_tokens):
        next_ids = sampler(logits, input_ids)  # (B,)
        yield next_ids
        if step + 1 < max_new_tokens:
            logits = model(next_ids[:, None], cache=cache, **forward_kwargs).logits[:, -1]


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
    sampler = Sampler(SamplingSettings(), input_ids.device)
    stop = torch.tensor(stop_token_ids, dtype=torch.long, device=input_ids.device)
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    counts, out = [0] * B, []
    steps = decode(model, input_ids, attention_mask, cache, sampler, max_new_tokens=max_new_tokens,
                   chunk_size=chunk_size, loops=loops)
    for next_ids in steps:
        next_ids = torch.where(done, out[-1], next_ids) if out else next_ids
        for b in range(B):
            counts[b] += int(not done[b])
        out.append(next_ids)
        done = done | torch.isin(next_ids, stop)
        if bool(done.all()):
            steps.close()
            break
    return GreedyResult(torch.stack(out, dim=1), counts)
