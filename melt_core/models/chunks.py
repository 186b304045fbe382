"""The one chunk splitter of MELT's chunk-wise computation (MELT.md §3): training, scoring, prefill."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from ..errors import InvalidArgumentError

ChunkAlign = Literal["start", "end"]


def chunk_lengths(length: int, chunk_size: int | Sequence[int] | None, align: ChunkAlign = "start") -> list[int]:
    """Split ``length`` tokens into chunks of at most ``chunk_size`` (None: one chunk), or check an
    explicit list of chunk lengths.

    ``start``: full chunks first, the remainder last (the training forward's chunking).
    ``end``: the remainder first, so that the last token closes a full chunk. Generation uses
    ``end``: left-padded rows of a batch then fall into exactly the chunks they get alone.
    """
    if length < 1:
        raise InvalidArgumentError("nothing to run: the input has no tokens")
    if chunk_size is not None and not isinstance(chunk_size, int):
        sizes = list(chunk_size)
        if sum(sizes) != length or any(c < 1 for c in sizes):
            raise InvalidArgumentError(f"chunk sizes {sizes} must be positive and sum to the length {length}")
        return sizes
    if chunk_size is not None and chunk_size < 1:
        raise InvalidArgumentError(f"chunk size must be >= 1, got {chunk_size}")
    if chunk_size is None or chunk_size >= length:
        return [length]
    sizes = [chunk_size] * (length // chunk_size)
    rest = length % chunk_size
    if rest:
        sizes = sizes + [rest] if align == "start" else [rest] + sizes
    return sizes
