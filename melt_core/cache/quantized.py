"""A quantised row store: KV rows kept as int8 or int4 with one fp16 scale per group of channels.

Each row (one K or V vector of one head, ``head_dim`` values) is split into groups of
``group_size`` channels; a group is stored as symmetric integers ``q = round(x / s)`` with
``s = absmax / qmax`` (qmax 127 for int8, 7 for int4; two int4 values share a byte). The newest
rows, those of the forward in progress, stay in full precision ("staged") until a later forward
starts past them: MELT rewrites a token's row at every loop, so each row is quantised once, after
its last loop. Ouro's per-loop slots are written once each and follow the same rule. With a
``residual`` window, the most recent ``residual`` finished positions of every slot also stay in
full precision (KIVI's and transformers' QuantizedCache's residual), in a preallocated ring.

``nbytes()`` counts the quantised storage, its scales and the residual ring exactly; the staged
rows of the forward in progress are transient (like activations) and not counted.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..dtypes import DTYPES
from ..errors import InvalidArgumentError
from .rows import merge_rows

SCALE_DTYPE = torch.float16


@dataclass(frozen=True)
class QuantFormat:
    """``bits`` 8 or 4; ``group_size`` channels share one scale (it must divide ``head_dim``; None:
    ``default_group_size(head_dim)``, which fits any model); ``residual``: the most recent positions
    kept in full precision (0: none)."""

    bits: int
    group_size: int | None = None
    residual: int = 0

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise InvalidArgumentError(f"quantised KV rows have 8 or 4 bits, got {self.bits}")
        if self.group_size is not None and (self.group_size < 2 or self.group_size % 2):
            raise InvalidArgumentError(f"the KV quantisation group size must be even and >= 2, got {self.group_size}")
        if self.residual < 0:
            raise InvalidArgumentError(
                f"the full-precision residual window must be >= 0 positions, got {self.residual}"
            )

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def group(self, head_dim: int) -> int:
        """The group size for rows of ``head_dim`` values: the one asked for, which must divide it, or
        the default that fits."""
        if self.group_size is None:
            return default_group_size(head_dim)
        if head_dim % self.group_size:
            raise InvalidArgumentError(f"the KV group size {self.group_size} must divide head_dim {head_dim}")
        return self.group_size

    def row_bytes(self, head_dim: int) -> int:
        """Bytes of one stored row of ``head_dim`` values: integers plus one fp16 scale per group."""
        return head_dim * self.bits // 8 + head_dim // self.group(head_dim) * SCALE_DTYPE.itemsize


MAX_DEFAULT_GROUP = 32


def default_group_size(head_dim: int) -> int:
    """The largest even divisor of ``head_dim`` up to 32 (32 for the usual head_dim 64 or 128, 16 for 16)."""
    sizes = [g for g in range(2, min(head_dim, MAX_DEFAULT_GROUP) + 1, 2) if head_dim % g == 0]
    if not sizes:
        raise InvalidArgumentError(f"int8 / int4 KV rows need an even head_dim, got {head_dim}")
    return sizes[-1]


KV_DTYPES = ("auto", "bf16", "fp16", "fp32", "int8", "int4")


@dataclass(frozen=True)
class KVFormat:
    """How a cache stores its rows: a float ``dtype`` (None: the model's) or ``quant``."""

    dtype: torch.dtype | None = None
    quant: QuantFormat | None = None

    def row_bytes(self, head_dim: int, model_dtype: torch.dtype) -> int:
        """Bytes of one stored K (or V) row of one head."""
        if self.quant is not None:
            return self.quant.row_bytes(head_dim)
        return head_dim * (self.dtype or model_dtype).itemsize

    def window_bytes(self, head_dim: int, model_dtype: torch.dtype, max_len: int) -> int:
        """Bytes of one slot's full-precision residual ring per K (or V), head and batch row."""
        if self.quant is None:
            return 0
        return min(self.quant.residual, max_len) * head_dim * model_dtype.itemsize


def kv_format(name: str | KVFormat | None, group_size: int | None = None, residual: int = 0) -> KVFormat:
    """``auto`` (the model's dtype), ``bf16``, ``fp16``, ``fp32``, ``int8`` or ``int4`` (with
    ``group_size`` channels per scale, None: the default for the model's head_dim, and the ``residual``
    most recent positions in full precision)."""
    if isinstance(name, KVFormat):
        return name
    if residual and name not in ("int8", "int4"):
        raise InvalidArgumentError(f"a full-precision residual window applies to int8 / int4 rows, not {name!r}")
    if name is None or name == "auto":
        return KVFormat()
    if name in DTYPES:  # fp32 / float32, bf16 / bfloat16, fp16 / float16: as --dtype takes them
        return KVFormat(dtype=DTYPES[name])
    if name in ("int8", "int4"):
        return KVFormat(quant=QuantFormat(int(name[3:]), group_size, residual))
    raise InvalidArgumentError(f"unknown KV dtype {name!r}; use one of {', '.join(KV_DTYPES)}")


def quantize(x: Tensor, fmt: QuantFormat) -> tuple[Tensor, Tensor]:
    """(..., d) floats -> integers (..., d) int8, or (..., d/2) uint8 packed for int4, and scales
    (..., d / group_size) fp16."""
    *lead, d = x.shape
    g = fmt.group(d)
    groups = x.float().reshape(*lead, d // g, g)
    scale = (groups.abs().amax(-1, keepdim=True) / fmt.qmax).to(SCALE_DTYPE)
    safe = scale.float().clamp_min(torch.finfo(SCALE_DTYPE).tiny)
    q = torch.round(groups / safe).clamp(-fmt.qmax, fmt.qmax).to(torch.int8).reshape(*lead, d)
    if fmt.bits == 4:  # two's-complement nibbles, low nibble first
        nibbles = (q & 0xF).to(torch.uint8)
        q = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
    return q, scale.squeeze(-1)


def dequantize(q: Tensor, scale: Tensor, fmt: QuantFormat, dtype: torch.dtype) -> Tensor:
    """The inverse of ``quantize`` (up to rounding), in ``dtype``."""
    if fmt.bits == 4:
        low, high = (q & 0xF).to(torch.int8), (q >> 4).to(torch.int8)
        low, high = torch.where(low > 7, low - 16, low), torch.where(high > 7, high - 16, high)
        q = torch.stack((low, high), dim=-1).flatten(-2)
    *lead, d = q.shape
    g = fmt.group(d)
    groups = q.float().reshape(*lead, d // g, g) * scale.float()[..., None]
    return groups.reshape(*lead, d).to(dtype)


class QuantizedRows:
    """Rows of ``num_slots`` slots, (B, kv_heads, max_len, head_dim) each, stored quantised.

    Per slot: positions [0, committed) are quantised, [committed, finished) sit in the residual
    ring (position p at index p % window), and the forward in progress is staged in full precision.
    """

    def __init__(
        self,
        num_slots: int,
        batch_size: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        fmt: QuantFormat,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        fmt = replace(fmt, group_size=fmt.group(head_dim))
        self.fmt, self.dtype, self.head_dim = fmt, dtype, head_dim
        shape = (num_slots, batch_size, kv_heads, max_len)
        width = head_dim * fmt.bits // 8
        int_dtype = torch.int8 if fmt.bits == 8 else torch.uint8
        self.q = [torch.zeros(*shape, width, dtype=int_dtype, device=device) for _ in range(2)]  # K, V
        self.scales = [
            torch.zeros(*shape, head_dim // fmt.group_size, dtype=SCALE_DTYPE, device=device) for _ in range(2)
        ]
        self.window = min(fmt.residual, max_len)
        ring = (num_slots, batch_size, kv_heads, self.window, head_dim)
        self.ring = [torch.zeros(ring, dtype=dtype, device=device) for _ in range(2)] if self.window else []
        self.num_slots = num_slots
        self.reset()

    def reset(self) -> None:
        """Forget every row: the next write starts at position 0 (the storage is kept)."""
        self.committed = [0] * self.num_slots  # positions [0, committed) of a slot are quantised
        self.finished = [0] * self.num_slots  # positions [0, finished) belong to forwards that are over
        self.staged: dict[int, tuple[int, list[Tensor]]] = {}  # slot -> (start, [k, v]) in full precision

    def _ring_rows(self, i: int, slot: int, begin: int, end: int) -> Tensor:
        """Rows [begin, end) of ``slot`` from the residual ring (K for i = 0, V for i = 1)."""
        if end <= begin:  # nothing in the ring (or no ring)
            B, heads, _, _ = self.q[i].shape[1:]
            return torch.zeros(B, heads, 0, self.head_dim, dtype=self.dtype, device=self.q[i].device)
        index = torch.arange(begin, end, device=self.q[i].device) % self.window
        return self.ring[i][slot].index_select(2, index)

    def _finish(self, slot: int) -> None:
        """The staged forward of ``slot`` is over: its rows join the ring, and every row that falls
        out of the residual window is quantised."""
        start, rows = self.staged.pop(slot)
        end = start + rows[0].shape[2]
        committed = max(self.committed[slot], end - self.window)
        for i, new in enumerate(rows):
            tail = torch.cat([self._ring_rows(i, slot, self.committed[slot], start), new.to(self.dtype)], dim=2)
            old = tail[:, :, : committed - self.committed[slot]]  # positions [committed before, committed)
            if old.shape[2]:
                q, s = quantize(old, self.fmt)
                self.q[i][slot, :, :, self.committed[slot] : committed] = q
                self.scales[i][slot, :, :, self.committed[slot] : committed] = s
            if self.window:
                index = torch.arange(committed, end, device=tail.device) % self.window
                self.ring[i][slot].index_copy_(2, index, tail[:, :, committed - self.committed[slot] :])
        self.committed[slot], self.finished[slot] = committed, end

    def write(
        self, slot: int, start: int, k: Tensor, v: Tensor, rows: Tensor | None = None, keep: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        if slot in self.staged and self.staged[slot][0] != start:
            self._finish(slot)
        if slot not in self.staged:
            if self.finished[slot] != start:
                raise ValueError(f"slot {slot} holds {self.finished[slot]} positions; the write starts at {start}")
            self.staged[slot] = (start, [None, None])
        staged = self.staged[slot][1]
        out = []
        for i, new in enumerate((k, v)):
            staged[i] = merge_rows(staged[i], new, rows, keep)
            mine = staged[i] if rows is None else staged[i][rows]
            parts = [
                dequantize(
                    self.q[i][slot, :, :, : self.committed[slot]],
                    self.scales[i][slot, :, :, : self.committed[slot]],
                    self.fmt,
                    self.dtype,
                ),
                self._ring_rows(i, slot, self.committed[slot], start),
            ]
            if rows is not None:
                parts = [p[rows] for p in parts]
            out.append(torch.cat([*parts, mine.to(self.dtype)], dim=2))
        return out[0], out[1]

    def nbytes(self) -> int:
        """Exact bytes of the quantised storage, its scales and the residual ring."""
        return sum(t.nbytes for t in self.q + self.scales + self.ring)
