"""The KV cache: its layout (which slot each (loop, layer) writes), the row stores that hold the
rows (float, int8 / int4 with a residual window, differentiable for training), and ``KVCache``.

No model code here: how a row is made (Ouro's k/v of u, MELT's k/v of the latent state) is the
model's KV policy (``models.kv``).
"""

from .kv_cache import KVCache
from .layout import CACHE_LAYOUTS, MELT_LAYOUTS, CacheLayout, cache_layout
from .quantized import KV_DTYPES, KVFormat, QuantFormat, kv_format
from .rows import GrowingRows, PreallocatedRows, RowState, RowStore, TokenLedger

__all__ = [
    "CACHE_LAYOUTS",
    "KV_DTYPES",
    "MELT_LAYOUTS",
    "CacheLayout",
    "GrowingRows",
    "KVCache",
    "KVFormat",
    "PreallocatedRows",
    "QuantFormat",
    "RowState",
    "RowStore",
    "TokenLedger",
    "cache_layout",
    "kv_format",
]
