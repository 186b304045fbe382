"""KV caches: explicit, preallocated objects whose layout and size are known up front.

Every cache records which positions hold real tokens (left padding does not), so masks and
position ids are always built from the whole sequence seen so far, never from the new tokens
alone (the reference Ouro code's batched-generation bug).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import OuroConfig
from .errors import InvalidArgumentError
from .layers import DecoderLayer


class TokenLedger:
    """Which positions of a batch have been written, and which of them are real tokens.

    ``valid``: bool (B, max_len); True where a real (non-padding) token sits.
    ``length``: number of positions written so far (the same for every row: batches are
    left-padded to a rectangle).
    """

    def __init__(self, batch_size: int, max_len: int, device: torch.device | str) -> None:
        self.batch_size = batch_size
        self.max_len = max_len
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0
        self._padded = False

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

    def reset(self) -> None:
        self.valid.zero_()
        self.length = 0
        self._padded = False


class _PreallocatedRows(TokenLedger):
    """Key and value storage of shape (slots, B, kv_heads, max_len, head_dim), written in place."""

    def __init__(self, config: OuroConfig, num_slots: int, batch_size: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__(batch_size, max_len, device)
        shape = (num_slots, batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)

    def rows(self, slot: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write the new tokens' rows (the last ``k.shape[2]`` positions) into ``slot``; return all its rows."""
        start = self.length - k.shape[2]
        self.keys[slot, :, :, start:self.length] = k
        self.values[slot, :, :, start:self.length] = v
        return self.keys[slot, :, :, :self.length], self.values[slot, :, :, :self.length]

    def nbytes(self) -> int:
        """Bytes of key/value storage (the validity ledger, B x max_len bools, is not counted)."""
        return self.keys.nbytes + self.values.nbytes


class PerLoopKVCache(_PreallocatedRows):
    """Ouro's KV cache: one slot per (loop, layer).

    Layout: ``keys`` and ``values`` are each (num_loops * num_layers, B, kv_heads, max_len, head_dim);
    slot ``loop * num_layers + layer`` (see ``slot``) holds the rotated keys (values) that layer
    ``layer`` produced at loop ``loop``. Memory grows linearly with the number of loops.
    Inference only: writes are in place, so run under ``torch.no_grad()``.
    """

    def __init__(self, config: OuroConfig, batch_size: int, max_len: int, loops: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.num_layers = config.num_hidden_layers
        self.loops = config.total_ut_steps if loops is None else loops
        if self.loops < 1:
            raise InvalidArgumentError(f"loops must be >= 1, got {self.loops}")
        super().__init__(config, self.loops * self.num_layers, batch_size, max_len, dtype, device)

    def slot(self, loop: int, layer: int) -> int:
        """The slot of (loop, layer): loops are the outer dimension."""
        return loop * self.num_layers + layer

    def keys_values(self, layer: DecoderLayer, layer_idx: int, loop: int, u: Tensor,
                    rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return self.rows(self.slot(loop, layer_idx), *layer.self_attn.project_kv(u, rope))

    def nbytes_per_loop(self) -> list[int]:
        """Key/value bytes each loop owns (equal for all loops)."""
        return [self.nbytes() // self.loops] * self.loops


class SharedKVCache(_PreallocatedRows):
    """MELT's KV cache: ONE key row and ONE value row per token per layer, shared by all loops.

    Layout: ``keys`` and ``values`` are each (num_layers, B, kv_heads, max_len, head_dim); slot
    ``layer`` holds every token's current row for that layer. Later loops of a token overwrite its
    row; after its last loop the row is final. Memory does not depend on the loop count.
    Inference only: writes are in place, so run under ``torch.no_grad()``.
    """

    loops = None  # any loop count fits

    def __init__(self, config: OuroConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.num_layers = config.num_hidden_layers
        super().__init__(config, self.num_layers, batch_size, max_len, dtype, device)


class GrowingRows:
    """Differentiable row store for chunk-wise training: earlier chunks' rows are tensors kept in
    the autograd graph (so gradients reach them), and the current chunk's rows are appended by
    concatenation instead of written in place.

    ``frozen_keys[slot]`` / ``frozen_values[slot]``: (B, kv_heads, start, d) rows of earlier
    chunks. ``rows`` returns them with the current rows appended; the last rows returned for a
    slot (its last loop) are that slot's frozen rows for the next chunk (``next_frozen``).
    """

    def __init__(self, frozen_keys: list[Tensor], frozen_values: list[Tensor]) -> None:
        self.frozen_keys, self.frozen_values = frozen_keys, frozen_values
        self.latest_keys, self.latest_values = list(frozen_keys), list(frozen_values)

    @staticmethod
    def empty(num_slots: int, batch_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
              device: torch.device | str) -> tuple[list[Tensor], list[Tensor]]:
        empty = torch.zeros(batch_size, kv_heads, 0, head_dim, dtype=dtype, device=device)
        return [empty] * num_slots, [empty] * num_slots

    def rows(self, slot: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.latest_keys[slot] = torch.cat([self.frozen_keys[slot], k], 2)
        self.latest_values[slot] = torch.cat([self.frozen_values[slot], v], 2)
        return self.latest_keys[slot], self.latest_values[slot]

    def next_frozen(self) -> tuple[list[Tensor], list[Tensor]]:
        return self.latest_keys, self.latest_values
