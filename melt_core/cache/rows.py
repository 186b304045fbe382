"""Row stores: where a cache's key/value rows live. A store knows nothing about loops or layers.

A store has ``num_slots`` slots; a slot holds one K row and one V row per position, each
(B, kv_heads, head_dim). A cache layout (``cache.layout``) decides which slot a (loop, layer) writes.

- ``PreallocatedRows``: inference. Storage for ``max_len`` positions allocated up front (memory is
  predictable and ``nbytes()`` exact), written in place: run under ``torch.no_grad()``.
- ``GrowingRows``: chunk-wise training and scoring. Earlier chunks' rows are tensors kept in the
  autograd graph, one tensor per (slot, chunk) that every later chunk shares; a write concatenates
  them with the current chunk's rows for that one attention, so gradients reach earlier chunks and
  the rows a training step keeps grow linearly with the sequence, not with its square.

``TokenLedger`` records which positions of a batch hold real tokens (left padding does not), so
that masks and positions are always built from the whole sequence seen so far, never from the new
tokens alone (the reference Ouro code's batched-generation bug).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from ..errors import InvalidArgumentError


class RowStore(Protocol):
    def write(
        self, slot: int, start: int, k: Tensor, v: Tensor, rows: Tensor | None = None, keep: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Write rows k, v (B, kv_heads, S, d) at positions [start, start + S) of ``slot``; return
        every row of the slot so far, (B, kv_heads, start + S, d) each.

        Adaptive depth (inference stores only): ``rows`` — the batch rows that k, v belong to
        (the rest are not computed at this loop); ``keep`` (len(rows), S) — positions whose rows
        stay as they are (tokens that have exited). The returned rows are those of ``rows``.
        """
        ...

    def nbytes(self) -> int: ...

    def reset(self) -> None:
        """Forget every row written (inference stores; the storage is kept)."""
        ...


def merge_rows(current: Tensor | None, new: Tensor, rows: Tensor | None, keep: Tensor | None) -> Tensor:
    """A forward's rows (B, kv_heads, S, d) after writing ``new`` for the batch rows ``rows`` (None:
    all), except at the (row, position) pairs marked in ``keep`` (len(rows), S): tokens that have
    left the loop keep their rows. ``current`` None: the forward's first write, of every row."""
    if current is None or (rows is None and keep is None):
        if rows is not None or keep is not None:
            raise ValueError("a forward's first write of a slot must cover every batch row and position")
        return new
    mine = current if rows is None else current[rows]
    if keep is not None:
        new = torch.where(keep[:, None, :, None], mine.to(new.dtype), new)
    if rows is None:
        return new
    merged = current.clone()
    merged[rows] = new.to(merged.dtype)
    return merged


class TokenLedger:
    """Which positions of a batch have been written, and which of them are real tokens.

    ``valid``: bool (B, max_len); True where a real (non-padding) token sits.
    ``length``: positions written so far (the same for every row: batches are left-padded to a rectangle).
    """

    def __init__(self, batch_size: int, max_len: int, device: torch.device | str) -> None:
        self.batch_size = batch_size
        self.max_len = max_len
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0
        self._padded = False

    def resized(self, max_len: int) -> TokenLedger:
        """A copy with room for ``max_len`` positions (at least those written)."""
        if max_len < self.length:
            raise InvalidArgumentError(f"the cache holds {self.length} positions; it cannot shrink to {max_len}")
        grown = TokenLedger(self.batch_size, max_len, self.valid.device)
        grown.valid[:, : self.length] = self.valid[:, : self.length]
        grown.length, grown._padded = self.length, self._padded
        return grown

    def reset(self) -> None:
        """No position written (the same tensor, cleared in place)."""
        self.valid.zero_()
        self.length, self._padded = 0, False

    def begin(self, num_tokens: int, attention_mask: Tensor | None) -> tuple[int, Tensor | None]:
        """Reserve positions for ``num_tokens`` new tokens; return (start, key validity (B, end)
        or None when no position so far is padding)."""
        start, end = self.length, self.length + num_tokens
        if end > self.max_len:
            raise InvalidArgumentError(
                f"the cache holds {self.max_len} positions; {start} are used and {num_tokens} more do not fit"
            )
        if attention_mask is None:
            self.valid[:, start:end] = True
        else:
            if attention_mask.shape != (self.batch_size, num_tokens):
                raise InvalidArgumentError(
                    f"attention_mask must cover the new tokens only, shape {(self.batch_size, num_tokens)}, "
                    f"got {tuple(attention_mask.shape)}"
                )
            new_valid = attention_mask.to(torch.bool)
            self.valid[:, start:end] = new_valid
            self._padded = self._padded or not bool(new_valid.all())
        self.length = end
        return start, (self.valid[:, :end] if self._padded else None)


class PreallocatedRows:
    """``keys`` and ``values``, each (num_slots, B, kv_heads, max_len, head_dim), written in place."""

    def __init__(
        self,
        num_slots: int,
        batch_size: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        shape = (num_slots, batch_size, kv_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.compute_dtype = compute_dtype or dtype  # rows are stored in dtype, returned in this

    @property
    def num_slots(self) -> int:
        return self.keys.shape[0]

    def resized(self, max_len: int, length: int) -> PreallocatedRows:
        """A copy with room for ``max_len`` positions, holding the first ``length`` of these."""
        slots, B, heads, _, d = self.keys.shape
        grown = PreallocatedRows(slots, B, heads, max_len, d, self.keys.dtype, self.keys.device, self.compute_dtype)
        grown.keys[:, :, :, :length] = self.keys[:, :, :, :length]
        grown.values[:, :, :, :length] = self.values[:, :, :, :length]
        return grown

    def write(
        self, slot: int, start: int, k: Tensor, v: Tensor, rows: Tensor | None = None, keep: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        end = start + k.shape[2]
        for store, new in ((self.keys, k), (self.values, v)):
            view = store[slot, :, :, start:end]
            view.copy_(merge_rows(view, new, rows, keep))
        keys, values = self.keys[slot, :, :, :end], self.values[slot, :, :, :end]
        if rows is not None:
            keys, values = keys[rows], values[rows]
        if keys.dtype != self.compute_dtype:
            return keys.to(self.compute_dtype), values.to(self.compute_dtype)
        return keys, values

    def nbytes(self) -> int:
        """Bytes of key/value storage."""
        return self.keys.nbytes + self.values.nbytes

    def reset(self) -> None:
        """Nothing to forget: a write never depends on what a position held before."""


@dataclass(frozen=True)
class RowState:
    """The rows of the chunks processed so far: ``keys[slot]`` and ``values[slot]`` are lists with
    one (B, kv_heads, chunk length, d) tensor per chunk, in order, stored in (at least) ``dtype``.
    Each chunk's tensors are made once and shared by every later state (never copied into a longer
    tensor), so a chunk checkpoint that keeps its input state keeps references, not copies."""

    keys: list[list[Tensor]]
    values: list[list[Tensor]]
    dtype: torch.dtype

    @property
    def length(self) -> int:
        """Positions held (those of slot 0; every slot holds the same)."""
        return sum(t.shape[2] for t in self.keys[0]) if self.keys else 0

    def slot_length(self, slot: int) -> int:
        return sum(t.shape[2] for t in self.keys[slot])

    def detached(self) -> RowState:
        """The same rows cut from the autograd graph (``detach_history``)."""
        return RowState(
            [[t.detach() for t in slot] for slot in self.keys],
            [[t.detach() for t in slot] for slot in self.values],
            self.dtype,
        )

    def nbytes(self) -> int:
        return sum(t.nbytes for slot in self.keys + self.values for t in slot)


class GrowingRows:
    """Differentiable rows over a ``RowState`` of earlier chunks (``frozen``). ``write`` returns
    the slot's earlier rows concatenated with the new ones, (B, kv_heads, start + S, d): a tensor
    made for that one attention (its backward slices the gradient back to each chunk's tensor).
    The last rows written to a slot (its last loop) are that slot's rows of this chunk in the next
    state (``state``)."""

    def __init__(self, frozen: RowState) -> None:
        self.frozen = frozen
        self.latest_keys: list[Tensor | None] = [None] * len(frozen.keys)
        self.latest_values: list[Tensor | None] = [None] * len(frozen.values)

    def reset(self) -> None:
        """No rows: neither earlier chunks' nor this one's."""
        self.frozen = GrowingRows.empty(len(self.frozen.keys), self.frozen.dtype)
        self.latest_keys = [None] * len(self.frozen.keys)
        self.latest_values = [None] * len(self.frozen.values)

    @staticmethod
    def empty(num_slots: int, dtype: torch.dtype) -> RowState:
        """No rows yet; rows will be kept in ``dtype`` or wider (a bf16 projection under autocast
        is stored in an fp32 model's dtype, as it is attended over)."""
        return RowState([[] for _ in range(num_slots)], [[] for _ in range(num_slots)], dtype)

    def write(
        self, slot: int, start: int, k: Tensor, v: Tensor, rows: Tensor | None = None, keep: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        if rows is not None or keep is not None:
            raise InvalidArgumentError(
                "adaptive depth runs at inference, with a KV cache; training rows cover every token"
            )
        held = self.frozen.slot_length(slot)
        if held != start:
            raise ValueError(f"slot {slot} holds {held} frozen rows, the chunk starts at {start}")
        k, v = self._stored(k), self._stored(v)
        self.latest_keys[slot], self.latest_values[slot] = k, v
        return torch.cat([*self.frozen.keys[slot], k], 2), torch.cat([*self.frozen.values[slot], v], 2)

    def _stored(self, rows: Tensor) -> Tensor:
        dtype = torch.promote_types(self.frozen.dtype, rows.dtype)
        return rows if rows.dtype == dtype else rows.to(dtype)

    def state(self) -> RowState:
        """The frozen rows plus this chunk's last-written rows of every slot written."""

        def grown(frozen: list[list[Tensor]], latest: list[Tensor | None]) -> list[list[Tensor]]:
            return [chunks if new is None else [*chunks, new] for chunks, new in zip(frozen, latest, strict=True)]

        keys, values = grown(self.frozen.keys, self.latest_keys), grown(self.frozen.values, self.latest_values)
        return RowState(keys, values, self.frozen.dtype)

    def nbytes(self) -> int:
        return self.state().nbytes()
