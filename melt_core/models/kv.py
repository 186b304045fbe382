"""KV policies: which keys and values layer l attends over at loop t, and where its rows go.

A policy gets the layer's normalised attention input ``u`` and says what the new keys/values are
projected from (``source``); it writes the new rows into a row store (``models.rows``) and returns
the keys/values to attend over (``rows``). The block code is the same for every policy
(``layers.DecoderLayer``).

- ``FullSequenceKV``: no store; a forward sees only its own tokens (Ouro's parallel forward).
- ``PerLoopKV``: Ouro. One slot per (loop, layer) (``slot``), rows = k/v projections of u.
- ``SharedKV``: MELT. One slot per layer, shared by all loops; rows = k/v projections of the
  token's latent state h, which an update rule (``models.update_rules``) moves from loop to loop.
- ``InterpolatedKV``: phase 1 of training, ``alpha * KV_MELT + (1 - alpha) * KV_Ouro``.

``KVCache`` is what inference keeps between forwards: a ledger of real positions and a
preallocated store, sized by the config (``kv_slots_per_loop``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InvalidArgumentError
from .config import OuroConfig
from .layers import DecoderLayer
from .quantized import KVFormat, QuantizedRows, kv_format
from .rows import PreallocatedRows, RowStore, TokenLedger
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
    """Ouro's rows: slot ``loop * num_layers + layer`` holds what layer ``layer`` produced at loop
    ``loop``. ``start``: the position of the forward's first token."""

    store: RowStore
    num_layers: int
    start: int

    def slot(self, loop: int, layer: int) -> int:
        """The slot of (loop, layer): loops are the outer dimension."""
        return loop * self.num_layers + layer

    def source(self, layer: DecoderLayer, layer_idx: int, loop: int, u: Tensor, rope: Rope) -> Tensor:
        return u

    def rows(self, layer_idx: int, loop: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.store.write(self.slot(loop, layer_idx), self.start, k, v)


class SharedKV:
    """MELT's rows for the tokens of one chunk: slot ``layer`` holds every token's current row; each
    loop overwrites the chunk's rows with k/v of the latent state ``h`` (queries still come from u).

    Adaptive depth (``models.adaptive``) sets ``batch_rows``, the batch rows computed at this loop, and
    ``keep``, the tokens of those rows that have exited: their rows stay those of their exit loop.
    """

    def __init__(self, rule: UpdateRule, store: RowStore, num_layers: int, start: int) -> None:
        self.rule, self.store, self.start = rule, store, start
        self.latent: list[Tensor | None] = [None] * num_layers  # h of the chunk's tokens, per layer
        self.batch_rows: Tensor | None = None
        self.keep: Tensor | None = None

    def slot(self, loop: int, layer: int) -> int:
        return layer

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
        return self.store.write(self.slot(loop, layer_idx), self.start, k, v, self.batch_rows, self.keep)


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


class KVCache:
    """An inference cache: a ledger of real positions and a preallocated row store.

    Layout: ``store.keys`` / ``store.values`` are each (slots, B, kv_heads, max_len, head_dim).
    Ouro has ``loops * num_layers`` slots (``PerLoopKV.slot``): memory grows linearly with loops.
    MELT has ``num_layers`` slots whatever the loop count (``loops`` only shapes its per-loop view).
    Inference only: writes are in place, so run under ``torch.no_grad()``. ``kv_dtype`` is the rows'
    storage format (``models.quantized.kv_format``: a name such as ``bf16`` or ``int8``, or a
    ``KVFormat``): a float dtype (None / ``auto``: ``dtype``), or int8 / int4 with group scales
    (``QuantizedRows``).
    """

    def __init__(
        self,
        config: OuroConfig,
        batch_size: int,
        max_len: int,
        loops: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        kv_dtype: str | KVFormat | None = None,
    ) -> None:
        self.loops = config.resolve_loops(loops)
        self.slots_per_loop = config.kv_slots_per_loop(self.loops)
        self.ledger = TokenLedger(batch_size, max_len, device)
        self.format = kv_format(kv_dtype)
        shape = (sum(self.slots_per_loop), batch_size, config.num_key_value_heads, max_len, config.head_dim)
        if self.format.quant is not None:
            self.store: RowStore = QuantizedRows(*shape, self.format.quant, dtype, device)
        else:
            self.store = PreallocatedRows(*shape, self.format.dtype or dtype, device, compute_dtype=dtype)

    @property
    def num_slots(self) -> int:
        return sum(self.slots_per_loop)

    @property
    def length(self) -> int:
        return self.ledger.length

    @property
    def max_len(self) -> int:
        return self.ledger.max_len

    def begin(self, num_tokens: int, attention_mask: Tensor | None) -> tuple[int, Tensor | None]:
        return self.ledger.begin(num_tokens, attention_mask)

    def resized(self, max_len: int) -> KVCache:
        """A copy of this cache with room for ``max_len`` positions (float rows only), for callers
        that do not know the final length up front (transformers' ``generate``)."""
        if not isinstance(self.store, PreallocatedRows):
            raise InvalidArgumentError("only a float-row cache can grow; pass max_len up front for int8 / int4 rows")
        grown = copy.copy(self)
        grown.ledger = self.ledger.resized(max_len)
        grown.store = self.store.resized(max_len, self.length)
        return grown

    def nbytes(self) -> int:
        """Exact bytes of key/value storage (the ledger's B x max_len bools are not counted)."""
        return self.store.nbytes()

    def nbytes_per_loop(self) -> list[int]:
        """The storage each loop adds: Ouro's equal per-loop slots; MELT's all at loop 1."""
        return [self.nbytes() * slots // self.num_slots for slots in self.slots_per_loop]
