"""Memory and speed of Ouro vs MELT vs a plain model: ``melt profile memory`` and ``melt profile speed``.

Analytic memory comes from the configs alone (models built on the ``meta`` device): weights =
parameters x dtype size, KV cache = bytes per token x sequence length x batch, with Ouro's KV per
token linear in the loop count and MELT's constant. It reproduces the MELT paper's Table 2.

Measurement runs a real prefill and decode through caches that record which rows they hold, so
the per-loop view of a decode step is observed, not computed: after every loop, the bytes of the
distinct cache rows — (slot, position) pairs, each one K and one V row per KV head and batch row —
written so far. Ouro writes a new layer stack of rows at every loop (slot (loop, layer)); MELT
writes the token's row of each layer at loop 1 and overwrites it at later loops.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint import build_model, checkpoint_dir, config_from_dict, load_config, load_model
from .config import MeltConfig, MeltSettings, OuroConfig
from .convert import melt_from_ouro
from .dtypes import dtype_bytes, dtype_name, parse_dtype
from .errors import CheckpointNotFoundError, InvalidArgumentError
from .generation import default_chunk_size, prefill
from .kv_cache import PerLoopKVCache, SharedKVCache
from .layers import DecoderLayer
from .melt import MeltForCausalLM
from .ouro import OuroForCausalLM
from .presets import PRESETS, preset_config
from .runtime import PeakMemory, memory_now, resolve_device, synchronize

# Display names of the presets' Ouro model and its MELT conversion (Ouro + 201M / 403M gate parameters).
PRESET_NAMES = {"ouro-1.4b": ("Ouro-1.4B", "MELT-1.6B"), "ouro-2.6b": ("Ouro-2.6B", "MELT-3.1B")}
# MELT preset names: the MELT conversion of an Ouro preset (every report shows both models anyway).
MELT_PRESETS = {"melt-1.6b": "ouro-1.4b", "melt-3.1b": "ouro-2.6b"}

LoopCallback = Callable[[int, int], None]  # (0-based loop, bytes of rows in use)
Progress = Callable[[str], None]


def resolve_preset(name: str) -> str:
    """An Ouro preset key from an Ouro or MELT preset name (case-insensitive)."""
    key = name.lower()
    key = MELT_PRESETS.get(key, key)
    if key not in PRESETS:
        raise InvalidArgumentError(
            f"unknown preset {name!r}; choose from {', '.join([*PRESETS, *MELT_PRESETS])}"
        )
    return key


def config_pair(config: OuroConfig) -> tuple[OuroConfig, MeltConfig]:
    """(Ouro config, MELT config) from either: a MELT config's base, or an Ouro config's conversion
    with default ``MeltSettings`` (what ``melt convert`` writes)."""
    if isinstance(config, MeltConfig):
        raw = {k: v for k, v in config.to_dict().items() if k != "melt"}
        return OuroConfig.from_dict({**raw, "model_type": "ouro"}), config
    return config, MeltConfig.from_ouro(config, MeltSettings())


def parameter_counts(config: OuroConfig) -> tuple[int, int]:
    """(all parameters, KV-gate parameters), counted on the meta device (nothing is allocated)."""
    model = build_model(config, "meta")
    total = sum(p.numel() for p in model.parameters())
    gates = sum(p.numel() for name, p in model.named_parameters() if ".kv_gate." in name)
    return total, gates


# --- per-loop row tracking ----------------------------------------------------------------------

class _RowUsage:
    """Which (slot, position) rows of a cache hold written data; ``on_loop_end(loop, bytes)`` is
    called after the last layer of every loop with the bytes of the rows written so far."""

    length: int
    on_loop_end: LoopCallback | None

    def _init_usage(self, config: OuroConfig, num_slots: int, batch_size: int, max_len: int,
                    dtype: torch.dtype) -> None:
        self.written = torch.zeros(num_slots, max_len, dtype=torch.bool)
        # one K and one V row of every KV head, for every batch row
        self.row_bytes = 2 * batch_size * config.num_key_value_heads * config.head_dim * dtype_bytes(dtype)
        self.on_loop_end = None

    def _mark(self, slot: int, num_new: int) -> None:
        self.written[slot, self.length - num_new:self.length] = True

    def bytes_in_use(self) -> int:
        return int(self.written.sum()) * self.row_bytes


class TrackedPerLoopKVCache(PerLoopKVCache, _RowUsage):
    """Ouro's per-(loop, layer) cache that records the rows it holds (see ``_RowUsage``)."""

    def __init__(self, config: OuroConfig, batch_size: int, max_len: int, loops: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        super().__init__(config, batch_size, max_len, loops, dtype=dtype, device=device)
        self._init_usage(config, self.loops * self.num_layers, batch_size, max_len, dtype)

    def keys_values(self, layer: DecoderLayer, layer_idx: int, loop: int, u: Tensor,
                    rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        keys, values = super().keys_values(layer, layer_idx, loop, u, rope)
        self._mark(self.slot(loop, layer_idx), u.shape[1])
        if layer_idx == self.num_layers - 1 and self.on_loop_end is not None:
            self.on_loop_end(loop, self.bytes_in_use())
        return keys, values


class TrackedSharedKVCache(SharedKVCache, _RowUsage):
    """MELT's shared cache that records the rows it holds (see ``_RowUsage``)."""

    def __init__(self, config: OuroConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        super().__init__(config, batch_size, max_len, dtype=dtype, device=device)
        self._init_usage(config, self.num_layers, batch_size, max_len, dtype)
        self._loop = 0

    def begin(self, num_tokens: int, attention_mask: Tensor | None) -> tuple[int, Tensor | None]:
        self._loop = 0  # MELT begins every chunk (and every decode step) at loop 0
        return super().begin(num_tokens, attention_mask)

    def rows(self, slot: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        keys, values = super().rows(slot, k, v)
        self._mark(slot, k.shape[2])
        if slot == self.num_layers - 1:
            if self.on_loop_end is not None:
                self.on_loop_end(self._loop, self.bytes_in_use())
            self._loop += 1
        return keys, values


def tracked_cache(model: nn.Module, batch_size: int, max_len: int,
                  loops: int) -> TrackedPerLoopKVCache | TrackedSharedKVCache:
    """A row-tracking cache of the right kind for ``model`` (what ``model.new_cache`` would build)."""
    if isinstance(model, MeltForCausalLM):
        return TrackedSharedKVCache(model.config, batch_size, max_len, dtype=model.dtype, device=model.device)
    return TrackedPerLoopKVCache(model.config, batch_size, max_len, loops, dtype=model.dtype, device=model.device)


# --- measurement --------------------------------------------------------------------------------

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

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.batch * self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch * self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "prefill_tokens_per_s": self.prefill_tokens_per_s,
                "decode_tokens_per_s": self.decode_tokens_per_s}


@torch.no_grad()
def measure_generation(model: nn.Module, *, loops: int, seq_len: int, batch: int = 1, decode_tokens: int = 1,
                       chunk_size: int | None = None, seed: int = 0, track_memory: bool = True) -> MeasuredRun:
    """Prefill ``seq_len - decode_tokens`` random tokens (seeded: the same ids for every model),
    then decode ``decode_tokens`` tokens one at a time (teacher-forced), through a row-tracking
    cache of exactly ``seq_len`` positions; time both phases and measure memory (see
    ``MeasuredRun``; without ``track_memory`` only the timings and the cache size are taken).
    ``chunk_size`` None: the model's generation default."""
    if loops < 1:
        raise InvalidArgumentError(f"loops must be >= 1, got {loops}")
    if decode_tokens < 1 or seq_len <= decode_tokens:
        raise InvalidArgumentError(f"need 1 <= decode tokens < sequence length, got {decode_tokens} and {seq_len}")
    if seq_len > model.config.max_position_embeddings:
        raise InvalidArgumentError(f"sequence length {seq_len} exceeds the model's maximum "
                                   f"{model.config.max_position_embeddings} (max_position_embeddings)")
    device = model.device
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq_len), generator=g).to(device)
    prompt, new = ids[:, :seq_len - decode_tokens], ids[:, seq_len - decode_tokens:]
    chunk = default_chunk_size(model) if chunk_size is None else chunk_size
    after_loop: list[int] = []
    meter = PeakMemory(device) if track_memory else None
    held = 0
    with meter if meter is not None else nullcontext():
        # speed runs use the model's own cache: no row bookkeeping in the timed loop
        cache = tracked_cache(model, batch, seq_len, loops) if track_memory else model.new_cache(batch, seq_len, loops)
        synchronize(device)
        t0 = time.perf_counter()
        prefill(model, prompt, None, cache, chunk, align="end", last_only=True, loops=loops)
        synchronize(device)
        t1 = time.perf_counter()
        for i in range(decode_tokens):
            if track_memory and i == decode_tokens - 1:  # the per-loop view of the last step
                cache.on_loop_end = lambda loop, nbytes: after_loop.append(nbytes)
            model(new[:, i:i + 1], cache=cache, loops=loops)
        synchronize(device)
        t2 = time.perf_counter()
        cache_bytes = cache.nbytes()
        if meter is not None:
            meter.sample()
            held = memory_now(device) - meter.baseline
        del cache
    return MeasuredRun(
        model_type=model.config.model_type, loops=loops, seq_len=seq_len, batch=batch,
        prefill_tokens=seq_len - decode_tokens, decode_tokens=decode_tokens, chunk_size=chunk,
        cache_bytes=cache_bytes, in_use_bytes_after_loop=after_loop,
        held_delta_bytes=max(0, held), peak_delta_bytes=meter.delta if meter is not None else 0,
        baseline_bytes=meter.baseline if meter is not None else 0,
        memory_kind=meter.kind if meter is not None else "not measured",
        prefill_seconds=t1 - t0, decode_seconds=t2 - t1,
    )


@dataclass
class ModelPair:
    """An Ouro model and its MELT counterpart, and where each came from."""

    ouro: OuroForCausalLM
    melt: MeltForCausalLM
    ouro_source: str
    melt_source: str


def load_pair(checkpoint: str | Path, dtype: str | torch.dtype | None = None,
              device: torch.device | str = "cpu") -> ModelPair:
    """Given an Ouro checkpoint: it, and its MELT conversion built in memory (shared weights, gates
    initialised as ``melt convert`` does). Given a MELT checkpoint: it, and the Ouro checkpoint its
    config records as ``melt.source``."""
    root = checkpoint_dir(checkpoint)
    config = load_config(root)
    if isinstance(config, MeltConfig):
        source = config.melt.source
        if not source:
            raise InvalidArgumentError(
                f"{root} is a MELT checkpoint that records no Ouro source (melt.source in config.json); "
                f"pass the Ouro checkpoint instead, or set melt.source"
            )
        if not Path(source).is_dir():
            raise CheckpointNotFoundError(
                f"{root} was converted from {source}, which does not exist here; pass the Ouro checkpoint instead"
            )
        melt = load_model(root, dtype=dtype, device=device)
        ouro = load_model(source, dtype=melt.dtype, device=device)
        return ModelPair(ouro, melt, str(source), str(root))
    ouro = load_model(root, dtype=dtype, device=device)
    return ModelPair(ouro, melt_from_ouro(ouro), str(root), f"in-memory conversion of {root} (untrained gates)")


# --- melt profile memory ------------------------------------------------------------------------

@dataclass
class MemoryEntry:
    """Memory of one model at one (loops, sequence length, batch). ``model``: ``ouro``, ``melt``
    or ``plain`` (the same layers run once, no exit gate). Bytes are exact; GB = 1e9 bytes.
    kv_cache_bytes_per_loop: the KV storage each loop adds (MELT: all of it at loop 1)."""

    model: str
    name: str
    loops: int
    seq_len: int
    batch: int
    parameters: int
    gate_parameters: int
    weights_bytes: int
    gate_bytes: int
    kv_cache_bytes: int
    kv_cache_bytes_per_loop: list[int]
    total_bytes: int
    measured: MeasuredRun | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["measured"] = None if self.measured is None else self.measured.to_dict()
        return out


@dataclass
class MemoryProfileArgs:
    """``melt profile memory``'s inputs: exactly one of ``checkpoint`` and ``preset``."""

    checkpoint: Path | None = None
    preset: str | None = None
    loops: Sequence[int] = (1, 2, 4, 8, 16)
    seq_lens: Sequence[int] = (4096, 32000)
    batch: int = 1
    dtype: str = "bf16"
    measure: bool = False
    device: str = "auto"
    chunk_size: int | None = None
    decode_tokens: int = 1


@dataclass
class MemoryReport:
    source: str
    dtype: str
    batch: int
    kv_bytes_per_token: dict[str, int]  # Ouro per loop, MELT (any loop count), plain
    entries: list[MemoryEntry] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "dtype": self.dtype, "batch": self.batch,
                "kv_bytes_per_token": self.kv_bytes_per_token, "entries": [e.to_dict() for e in self.entries]}


def _check_positive(name: str, values: Sequence[int]) -> None:
    if not values:
        raise InvalidArgumentError(f"{name} needs at least one value")
    bad = [v for v in values if v < 1]
    if bad:
        raise InvalidArgumentError(f"{name} must be >= 1, got {bad[0]}")


def memory_profile(args: MemoryProfileArgs, progress: Progress | None = None) -> MemoryReport:
    """Analytic memory of Ouro, its MELT conversion and a plain model of the same depth, for every
    loop count and sequence length; with ``measure``, each (loops, seq_len) also runs for real on
    the checkpoint's weights (Ouro and MELT) and the measured run is attached to the entry."""
    if (args.checkpoint is None) == (args.preset is None):
        raise InvalidArgumentError("pass a checkpoint directory or --preset NAME (exactly one)")
    if args.measure and args.checkpoint is None:
        raise InvalidArgumentError("--measure runs the model: it needs a checkpoint with weights, not a preset")
    _check_positive("loops", args.loops)
    _check_positive("seq-len", args.seq_lens)
    _check_positive("batch", [args.batch])
    dtype = parse_dtype(args.dtype)
    if args.preset is not None:
        key = resolve_preset(args.preset)
        config = config_from_dict(preset_config(key), source=f"preset {key}")
        ouro_name, melt_name = PRESET_NAMES[key]
        source = key
    else:
        config = load_config(args.checkpoint)
        ouro_name, melt_name = ("Ouro", "MELT") if config.model_type == "ouro" else ("Ouro (base)", "MELT")
        source = str(args.checkpoint)
    ouro_cfg, melt_cfg = config_pair(config)
    limit = ouro_cfg.max_position_embeddings
    too_long = [s for s in args.seq_lens if s > limit]
    if too_long:
        raise InvalidArgumentError(f"sequence length {too_long[0]} exceeds the model's maximum {limit} "
                                   f"(max_position_embeddings)")
    nbytes = dtype_bytes(dtype)
    ouro_params, _ = parameter_counts(ouro_cfg)
    melt_params, gate_params = parameter_counts(melt_cfg)
    plain_params = ouro_params - (ouro_cfg.hidden_size + 1)  # no exit gate
    N = ouro_cfg.num_hidden_layers
    report = MemoryReport(source=source, dtype=dtype_name(dtype), batch=args.batch, kv_bytes_per_token={
        "ouro_per_loop": ouro_cfg.kv_bytes_per_token(dtype, 1), "melt": melt_cfg.kv_bytes_per_token(dtype),
        "plain": ouro_cfg.kv_bytes_per_token(dtype, 1)})

    def entry(model: str, name: str, loops: int, seq_len: int, params: int, gates: int, kv: int,
              per_loop: list[int]) -> MemoryEntry:
        weights = params * nbytes
        return MemoryEntry(model=model, name=name, loops=loops, seq_len=seq_len, batch=args.batch,
                           parameters=params, gate_parameters=gates, weights_bytes=weights,
                           gate_bytes=gates * nbytes, kv_cache_bytes=kv, kv_cache_bytes_per_loop=per_loop,
                           total_bytes=weights + kv)

    for seq_len in args.seq_lens:
        tokens = seq_len * args.batch
        plain_kv = ouro_cfg.kv_bytes_per_token(dtype, 1) * tokens
        report.entries.append(entry("plain", f"plain {N}-layer", 1, seq_len, plain_params, 0, plain_kv, [plain_kv]))
        for loops in args.loops:
            ouro_kv = ouro_cfg.kv_bytes_per_token(dtype, loops) * tokens
            melt_kv = melt_cfg.kv_bytes_per_token(dtype, loops) * tokens
            report.entries.append(entry("ouro", ouro_name, loops, seq_len, ouro_params, 0, ouro_kv,
                                        [ouro_kv // loops] * loops))
            report.entries.append(entry("melt", melt_name, loops, seq_len, melt_params, gate_params, melt_kv,
                                        [melt_kv] + [0] * (loops - 1)))
    if args.measure:
        device = resolve_device(args.device)
        pair = load_pair(args.checkpoint, dtype=dtype, device=device)
        models = {"ouro": pair.ouro, "melt": pair.melt}
        for e in report.entries:
            if e.model in models:
                if progress is not None:
                    progress(f"measuring {e.name}: {e.loops} loop(s), {e.seq_len} tokens")
                e.measured = measure_generation(models[e.model], loops=e.loops, seq_len=e.seq_len, batch=args.batch,
                                                decode_tokens=args.decode_tokens, chunk_size=args.chunk_size)
    return report


# --- melt profile speed -------------------------------------------------------------------------

@dataclass
class SpeedProfileArgs:
    """``melt profile speed``'s inputs."""

    checkpoint: Path
    loops: Sequence[int] = (1, 2, 4, 8)
    prompt_tokens: int = 256
    new_tokens: int = 32
    batch: int = 1
    dtype: str | None = None
    device: str = "auto"
    chunk_size: int | None = None
    seed: int = 0


@dataclass
class SpeedRow:
    """Ouro vs MELT at one loop count; ratios are MELT / Ouro (above 1: MELT is faster)."""

    loops: int
    ouro: MeasuredRun
    melt: MeasuredRun

    @property
    def prefill_ratio(self) -> float:
        o = self.ouro.prefill_tokens_per_s
        return self.melt.prefill_tokens_per_s / o if o else 0.0

    @property
    def decode_ratio(self) -> float:
        o = self.ouro.decode_tokens_per_s
        return self.melt.decode_tokens_per_s / o if o else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"loops": self.loops, "ouro": self.ouro.to_dict(), "melt": self.melt.to_dict(),
                "prefill_ratio": self.prefill_ratio, "decode_ratio": self.decode_ratio}


@dataclass
class SpeedReport:
    ouro_source: str
    melt_source: str
    device: str
    dtype: str
    batch: int
    prompt_tokens: int
    new_tokens: int
    rows: list[SpeedRow]

    def to_dict(self) -> dict[str, Any]:
        return {"ouro_source": self.ouro_source, "melt_source": self.melt_source, "device": self.device,
                "dtype": self.dtype, "batch": self.batch, "prompt_tokens": self.prompt_tokens,
                "new_tokens": self.new_tokens, "rows": [r.to_dict() for r in self.rows]}


def speed_profile(args: SpeedProfileArgs, progress: Progress | None = None) -> SpeedReport:
    """Prefill and decode tokens/s of the Ouro source and its MELT conversion (same weights, same
    random prompt), at every loop count, after one short warm-up run per model. Each model
    prefills with its own default chunking (Ouro: the whole prompt; MELT: its chunk size) unless
    ``chunk_size`` sets both."""
    _check_positive("loops", args.loops)
    _check_positive("prompt tokens", [args.prompt_tokens])
    _check_positive("new tokens", [args.new_tokens])
    _check_positive("batch", [args.batch])
    device = resolve_device(args.device)
    pair = load_pair(args.checkpoint, dtype=args.dtype, device=device)
    seq_len = args.prompt_tokens + args.new_tokens
    for model in (pair.ouro, pair.melt):  # warm-up: first-call overheads out of the timings
        measure_generation(model, loops=1, seq_len=min(seq_len, 8), decode_tokens=min(args.new_tokens, 4),
                           batch=args.batch, chunk_size=args.chunk_size, track_memory=False)
    rows = []
    for loops in args.loops:
        runs = {}
        for name, model in (("ouro", pair.ouro), ("melt", pair.melt)):
            if progress is not None:
                progress(f"timing {name}: {loops} loop(s)")
            runs[name] = measure_generation(model, loops=loops, seq_len=seq_len, batch=args.batch,
                                            decode_tokens=args.new_tokens, chunk_size=args.chunk_size,
                                            seed=args.seed, track_memory=False)
        rows.append(SpeedRow(loops, runs["ouro"], runs["melt"]))
    return SpeedReport(ouro_source=pair.ouro_source, melt_source=pair.melt_source, device=str(device),
                       dtype=dtype_name(pair.ouro.dtype), batch=args.batch, prompt_tokens=args.prompt_tokens,
                       new_tokens=args.new_tokens, rows=rows)
