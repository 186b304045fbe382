"""``KVCache``: what inference keeps between forwards — a ledger of real positions and a
preallocated row store, sized by the model's cache layout."""

from __future__ import annotations

import copy
from typing import Protocol

import torch
from torch import Tensor

from ..errors import InvalidArgumentError
from .layout import CacheLayout
from .quantized import KVFormat, QuantizedRows, kv_format
from .rows import PreallocatedRows, RowStore, TokenLedger


class CacheShape(Protocol):
    """What a cache reads of a model config (``OuroConfig``)."""

    num_key_value_heads: int
    head_dim: int

    def resolve_loops(self, loops: int | None) -> int: ...

    def cache_layout(self) -> CacheLayout: ...


class KVCache:
    """An inference cache: a ledger of real positions and a preallocated row store.

    ``store.keys`` / ``store.values`` are each (slots, B, kv_heads, max_len, head_dim), the slots
    those of the config's layout (``layout``) at ``loops`` loops: Ouro's ``per_loop`` has
    ``loops * num_layers`` (memory grows linearly with loops), MELT's ``shared`` ``num_layers``
    whatever the loop count. Inference only: writes are in place, so run under ``torch.no_grad()``.
    ``kv_dtype`` is the rows' storage format (``cache.quantized.kv_format``: a name such as ``bf16``
    or ``int8``, or a ``KVFormat``): a float dtype (None / ``auto``: ``dtype``), or int8 / int4 with
    group scales (``QuantizedRows``).
    """

    def __init__(
        self,
        config: CacheShape,
        batch_size: int,
        max_len: int,
        loops: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        kv_dtype: str | KVFormat | None = None,
    ) -> None:
        self.loops = config.resolve_loops(loops)
        self.layout = config.cache_layout()
        self.slots_per_loop = self.layout.slots_per_loop(self.loops)
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
    def batch_size(self) -> int:
        return self.ledger.batch_size

    @property
    def length(self) -> int:
        return self.ledger.length

    @property
    def max_len(self) -> int:
        return self.ledger.max_len

    def begin(self, num_tokens: int, attention_mask: Tensor | None) -> tuple[int, Tensor | None]:
        return self.ledger.begin(num_tokens, attention_mask)

    def reset(self) -> None:
        """Empty the cache for a new batch of the same shape, keeping its storage (the same tensors:
        a captured CUDA graph over them stays valid). Rows are not zeroed: a position is read only
        once the ledger says it was written again."""
        self.ledger.reset()
        self.store.reset()

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
