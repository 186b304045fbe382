"""Real prefill + decode runs, timed, with the per-loop view of the cache and the peak memory.

The per-loop view is observed, not computed: the cache's row store is wrapped by ``RowUsage``,
which records the (slot, position) rows written, and a forward hook on the per-loop final norm
(which closes every loop) reads the bytes of the distinct rows written so far. Ouro writes a new
layer stack of rows at every loop (slot (loop, layer)); MELT writes the token's row of each layer
at loop 1 and overwrites it at later loops.

Prefill and decoding run through the inference engine (``inference.engine``) on a decode path:
the ordinary step (``eager``), or a fixed-shape one (``static``, ``graph``: CUDA graphs,
``compiled``; MELT's full prefill chunks too). A fixed-shape path first runs the run's shapes once
on the run's cache, which is then emptied (``KVCache.reset``: the same tensors, so captured graphs
stay valid), so that the timed run excludes its start-up (``startup_seconds``: compilation or
capture).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..cache.quantized import KVFormat
from ..cache.rows import RowStore
from ..errors import InvalidArgumentError
from ..inference.engine import Engine, EngineOptions
from ..models.config import validate_loops
from ..runtime import PeakMemory, memory_now, synchronize


class RowUsage:
    """A row store wrapper that records which (slot, position) rows hold written data.

    ``bytes_in_use()``: the bytes of the distinct rows written so far, a row being one K and one V
    vector of every KV head and batch row.
    """

    def __init__(self, store: RowStore, num_slots: int, max_len: int, row_bytes: int) -> None:
        self.store, self.row_bytes = store, row_bytes  # the stored bytes of one (slot, position)
        self.written = torch.zeros(num_slots, max_len, dtype=torch.bool)

    def write(
        self, slot: int, start: int, k: Tensor, v: Tensor, rows: Tensor | None = None, keep: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        self.written[slot, start : start + k.shape[2]] = True
        return self.store.write(slot, start, k, v, rows, keep)

    def bytes_in_use(self) -> int:
        return int(self.written.sum()) * self.row_bytes

    def nbytes(self) -> int:
        return self.store.nbytes()

    def reset(self) -> None:
        self.written.zero_()
        self.store.reset()


@dataclass
class MeasuredRun:
    """One real prefill + decode run through a cache sized for exactly ``seq_len`` positions.

    cache_bytes: the cache's exact K/V storage (``nbytes()``).
    in_use_bytes_after_loop: bytes of the rows written so far, after each loop of the LAST decode
      step (the per-loop view; see the module docstring).
    held_delta_bytes: memory held right after decoding (cache still alive) above the baseline taken
      before the cache was allocated (weights loaded); peak_delta_bytes: the peak above it, with
      prefill activations; baseline_bytes: that baseline (absolute peak = baseline + peak delta).
      memory_kind: ``cuda_allocated`` or ``process_rss`` (sampled).
    decode_path: the engine's (``eager``, ``static``, ``graph``, ``compiled``); startup_seconds: a
      fixed-shape path's start-up, the first calls of its shapes (compilation, 0 when torch's caches
      held them, or CUDA-graph capture).
    """

    model_type: str
    loops: int
    seq_len: int
    batch: int
    prefill_tokens: int
    decode_tokens: int
    chunk_size: int | None
    cache_bytes: int
    in_use_bytes_after_loop: list[int]
    held_delta_bytes: int
    peak_delta_bytes: int
    baseline_bytes: int
    memory_kind: str
    prefill_seconds: float
    decode_seconds: float
    decode_path: str = "eager"
    startup_seconds: float = 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.batch * self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch * self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
        }


@torch.no_grad()
def measure_generation(
    model: nn.Module,
    *,
    loops: int,
    seq_len: int,
    batch: int = 1,
    decode_tokens: int = 1,
    chunk_size: int | None = None,
    seed: int = 0,
    track_memory: bool = True,
    kv_dtype: str | KVFormat | None = None,
    decode: str = "eager",
) -> MeasuredRun:
    """Prefill ``seq_len - decode_tokens`` random tokens (seeded: the same ids for every model),
    then decode ``decode_tokens`` tokens one at a time (teacher-forced), through a row-tracking
    cache of exactly ``seq_len`` positions; time both phases and measure memory (see
    ``MeasuredRun``; without ``track_memory`` only the timings and the cache size are taken).
    ``chunk_size`` None: the model's generation default. ``decode``: the engine's decode path (a
    fixed-shape one: float rows only, no memory tracking)."""
    loops = validate_loops(loops)
    if decode_tokens < 1 or seq_len <= decode_tokens:
        raise InvalidArgumentError(f"need 1 <= decode tokens < sequence length, got {decode_tokens} and {seq_len}")
    if seq_len > model.config.max_position_embeddings:
        raise InvalidArgumentError(
            f"sequence length {seq_len} exceeds the model's maximum "
            f"{model.config.max_position_embeddings} (max_position_embeddings)"
        )
    engine = Engine(model, EngineOptions(loops=loops, chunk_size=chunk_size, kv_dtype=kv_dtype, decode=decode))
    if engine.path != "eager" and track_memory:
        raise InvalidArgumentError(f"the {engine.path} step is timed only: measure memory on the eager path")
    device = model.device
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq_len), generator=g).to(device)
    prompt, new = ids[:, : seq_len - decode_tokens], ids[:, seq_len - decode_tokens :]
    after_loop: list[int] = []
    meter = PeakMemory(device) if track_memory else None
    held = 0
    with meter if meter is not None else nullcontext():
        # speed runs use the model's own cache: no row bookkeeping in the timed loop
        cache = engine.new_cache(batch, seq_len)
        if engine.path != "eager":  # the start-up: the run's shapes once, then the same cache emptied
            engine.prefill(cache, prompt)
            engine.step(cache, new[:, :1])
            cache.reset()
        if track_memory:
            position_bytes = cache.nbytes() // (cache.num_slots * seq_len)
            usage = RowUsage(cache.store, cache.num_slots, cache.max_len, position_bytes)
            cache.store = usage
        synchronize(device)
        t0 = time.perf_counter()
        engine.prefill(cache, prompt)
        synchronize(device)
        t1 = time.perf_counter()
        for i in range(decode_tokens):
            if track_memory and i == decode_tokens - 1:  # the per-loop view of the last step
                hook = model.model.norm.register_forward_hook(lambda *_: after_loop.append(usage.bytes_in_use()))
            engine.step(cache, new[:, i : i + 1])
        if track_memory:
            hook.remove()
        synchronize(device)
        t2 = time.perf_counter()
        cache_bytes = cache.nbytes()
        if meter is not None:
            meter.sample()
            held = memory_now(device) - meter.baseline
        del cache
    return MeasuredRun(
        model_type=model.config.model_type,
        loops=loops,
        seq_len=seq_len,
        batch=batch,
        prefill_tokens=seq_len - decode_tokens,
        decode_tokens=decode_tokens,
        chunk_size=engine.chunk_size,
        cache_bytes=cache_bytes,
        in_use_bytes_after_loop=after_loop,
        held_delta_bytes=max(0, held),
        peak_delta_bytes=meter.delta if meter is not None else 0,
        baseline_bytes=meter.baseline if meter is not None else 0,
        memory_kind=meter.kind if meter is not None else "not measured",
        prefill_seconds=t1 - t0,
        decode_seconds=t2 - t1,
        decode_path=engine.path,
        startup_seconds=engine.startup_seconds,
    )
