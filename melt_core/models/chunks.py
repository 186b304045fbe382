"""The one chunk splitter of MELT's chunk-wise computation: training, scoring, prefill.

Which caller aligns its chunks how: docs/melt-method.md, "Chunk alignment".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

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


class RowShift:
    """Moves every row of a padded batch left by (its leading padding mod ``chunk_size``), so that
    its first real token starts a chunk, as it does when the row is run alone: with chunks counted
    from position 0, a row with 4 pad + 9 real tokens and chunks of 3 would otherwise be chunked
    1 + 3 + 3 + 2 instead of 3 + 3 + 3. The freed positions at the row's end become padding.

    ``pack`` applies the shift to a (B, S, ...) tensor; ``unpack`` moves a result back to the
    original positions (positions that were padding get an arbitrary row value).
    """

    def __init__(self, attention_mask: Tensor, chunk_size: int) -> None:
        B, S = attention_mask.shape
        real = attention_mask.bool()
        first = torch.where(real.any(1), real.float().argmax(1), 0)  # leading padding of each row
        self.shift = first % chunk_size  # (B,)
        positions = torch.arange(S, device=attention_mask.device)
        source = positions[None] + self.shift[:, None]  # new position j holds old position j + shift
        self._pack_index = source.clamp(max=S - 1)
        self._unpack_index = (positions[None] - self.shift[:, None]).clamp(min=0)
        self.mask = (real.gather(1, self._pack_index) & (source < S)).to(attention_mask.dtype)

    @classmethod
    def needed(cls, attention_mask: Tensor | None, chunk_size: int | Sequence[int] | None) -> RowShift | None:
        """A shift for a padded batch chunked by an int ``chunk_size`` smaller than the sequence,
        or None when every row already starts a chunk (or there is one chunk, or the caller chose
        the chunk lengths)."""
        if attention_mask is None or not isinstance(chunk_size, int) or chunk_size >= attention_mask.shape[1]:
            return None
        shift = cls(attention_mask, chunk_size)
        return shift if bool(shift.shift.any()) else None

    def pack(self, x: Tensor) -> Tensor:
        return _gather_positions(x, self._pack_index)

    def unpack(self, x: Tensor) -> Tensor:
        return _gather_positions(x, self._unpack_index)


def _gather_positions(x: Tensor, index: Tensor) -> Tensor:
    """x (B, S, ...) -> x[b, index[b, j], ...]."""
    expanded = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return x.gather(1, expanded)
