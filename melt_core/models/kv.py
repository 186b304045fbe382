"""KV policies: which keys and values layer l attends over at loop t, and where its rows go.

A policy gets the layer's normalised attention input ``u`` and says what the new keys/values are
projected from (``source``); it writes the new rows into a row store (``cache.rows``) and returns
the keys/values to attend over (``rows``). The block code is the same for every policy
(``layers.DecoderLayer``).

- ``FullSequenceKV``: no store; a forward sees only its own tokens (Ouro's parallel forward).
- ``PerLoopKV``: Ouro. Rows = k/v projections of u, one slot per (loop, layer).
- ``SharedKV``: MELT. Rows = k/v projections of the token's latent state h, which an update rule
  (``models.update_rules``) moves from loop to loop; the slots are shared by loops (one per layer,
  or ``first_then_shared``'s two).
- ``InterpolatedKV``: phase 1 of training, ``alpha * KV_MELT + (1 - alpha) * KV_Ouro``.

Which slot a (loop, layer) writes is the cache layout's (``cache.layout``); the cache that
inference keeps between forwards is ``cache.KVCache``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..cache.layout import CacheLayout
from ..cache.rows import RowStore
from .layers import DecoderLayer
from .update_rules import GATE_MODULE, UpdateRule

Rope = tuple[Tensor, Tensor]


class FullSequenceKV:
    """No cache: every forward sees only its own tokens (training, scoring a whole sequence)."""

    def source(self, layer: DecoderLayer, layer_idx: int, loop: int, u: Tensor, rope: Rope) -> Tensor:
        return u

    def rows(self, layer_idx: int, loop: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return k, v


@dataclass
class PerLoopKV:
    """Ouro's rows: the k/v of what layer ``layer`` saw at loop ``loop``, in the layout's slot
    (``per_loop``: one per (loop, layer)). ``start``: the position of the forward's first token."""

    store: RowStore
    layout: CacheLayout
    start: int

    def source(self, layer: DecoderLayer, layer_idx: int, loop: int, u: Tensor, rope: Rope) -> Tensor:
        return u

    def rows(self, layer_idx: int, loop: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.store.write(self.layout.slot(loop, layer_idx), self.start, k, v)


class SharedKV:
    """MELT's rows for the tokens of one chunk: each loop writes the chunk's rows, k/v of the latent
    state ``h`` (queries still come from u), to the layout's slot of (loop, layer) — ``shared``: one
    per layer, overwritten by every loop.

    Adaptive depth (``models.adaptive``) sets ``batch_rows``, the batch rows computed at this loop, and
    ``keep``, the tokens of those rows that have exited: their rows stay those of their exit loop.
    """

    def __init__(self, rule: UpdateRule, store: RowStore, layout: CacheLayout, start: int) -> None:
        self.rule, self.store, self.layout, self.start = rule, store, layout, start
        self.latent: list[Tensor | None] = [None] * layout.num_layers  # h of the chunk's tokens, per layer
        self.batch_rows: Tensor | None = None
        self.keep: Tensor | None = None

    def update_latent(self, layer: DecoderLayer, layer_idx: int, loop: int, u: Tensor) -> Tensor:
        gate = getattr(layer, GATE_MODULE, None)
        if loop == 0:
            h = self.latent[layer_idx] = self.rule.first(u, gate)
            return h
        previous = self.latent[layer_idx]
        if self.batch_rows is None:
            h = self.latent[layer_idx] = self.rule.next(loop, u, previous, gate)
            return h
        h = self.rule.next(loop, u, previous[self.batch_rows], gate)
        self.latent[layer_idx] = previous.index_copy(0, self.batch_rows, h)
        return h

    def source(self, layer: DecoderLayer, layer_idx: int, loop: int, u: Tensor, rope: Rope) -> Tensor:
        return self.update_latent(layer, layer_idx, loop, u)

    def rows(self, layer_idx: int, loop: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        slot = self.layout.slot(loop, layer_idx)
        return self.store.write(slot, self.start, k, v, self.batch_rows, self.keep)


@dataclass
class InterpolatedKV:
    """Phase 1 of training: attend over ``alpha * KV_MELT + (1 - alpha) * KV_base``, KV_base being
    Ouro's own per-loop rows (k/v of u), kept per (loop, layer)."""

    melt: SharedKV
    base: PerLoopKV
    alpha: float
    _base_rows: tuple[Tensor, Tensor] | None = None  # the base rows of the layer being run

    def source(self, layer: DecoderLayer, layer_idx: int, loop: int, u: Tensor, rope: Rope) -> Tensor:
        self._base_rows = self.base.rows(layer_idx, loop, *layer.self_attn.project_kv(u, rope))
        return self.melt.source(layer, layer_idx, loop, u, rope)

    def rows(self, layer_idx: int, loop: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        keys, values = self.melt.rows(layer_idx, loop, k, v)
        (base_keys, base_values), a = self._base_rows, self.alpha
        return a * keys + (1.0 - a) * base_keys, a * values + (1.0 - a) * base_values
