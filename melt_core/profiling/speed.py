"""``melt profile speed``: prefill and decode tokens/s of an Ouro model and its MELT conversion,
eager or compiled, with any KV row format, against the bandwidth floor of a decode step.

The floor of a decode step is the bytes it must read, over the device's measured copy bandwidth
(``copy_bandwidth``): the layer stack's weights once per loop, the final norm, exit gate and LM head
once, one embedding row per sequence, and the KV rows attended (``decode_step_bytes``). "x floor"
is a step's time over that floor (1.0: as fast as the memory allows; a small model whose weights
sit in a CPU cache is bound by overheads, not by this floor).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..cache.quantized import KVFormat, kv_format
from ..dtypes import dtype_name
from ..inference.engine import EngineOptions
from ..runtime import resolve_device, synchronize
from ..words import plural
from .measure import MeasuredRun, measure_generation
from .memory import Progress, check_loops, check_positive
from .pairs import load_pair


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
    rounds: int = 3  # Ouro and MELT alternate, round by round; each reports the median round
    decode: str = "auto"  # the engine's decode path (``inference.engine``): auto, eager, static, graph, compiled
    kv_dtype: str = "auto"  # KV rows: auto (the model's dtype), bf16, fp16, fp32, int8, int4
    kv_group_size: int | None = None
    kv_residual: int = 0

    def kv_format(self) -> KVFormat:
        return kv_format(self.kv_dtype, self.kv_group_size, self.kv_residual)


@dataclass
class SpeedRow:
    """Ouro vs MELT at one loop count; ratios are MELT / Ouro (above 1: MELT is faster).
    ``*_floor_bytes``: what one decode step must read (``decode_step_bytes``); ``bandwidth``: the
    median measured copy bandwidth of the rounds, bytes/s."""

    loops: int
    ouro: MeasuredRun
    melt: MeasuredRun
    ouro_floor_bytes: int = 0
    melt_floor_bytes: int = 0
    bandwidth: float = 0.0

    def floor_seconds(self, name: str) -> float:
        """The floor of one decode step of ``ouro`` or ``melt``: its bytes over the bandwidth."""
        nbytes = self.ouro_floor_bytes if name == "ouro" else self.melt_floor_bytes
        return nbytes / self.bandwidth if self.bandwidth else 0.0

    def x_floor(self, name: str) -> float:
        """A decode step's time over its floor."""
        run, floor = (self.ouro if name == "ouro" else self.melt), self.floor_seconds(name)
        return run.decode_seconds / run.decode_tokens / floor if floor else 0.0

    @property
    def prefill_ratio(self) -> float:
        o = self.ouro.prefill_tokens_per_s
        return self.melt.prefill_tokens_per_s / o if o else 0.0

    @property
    def decode_ratio(self) -> float:
        o = self.ouro.decode_tokens_per_s
        return self.melt.decode_tokens_per_s / o if o else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "loops": self.loops,
            "ouro": self.ouro.to_dict(),
            "melt": self.melt.to_dict(),
            "prefill_ratio": self.prefill_ratio,
            "decode_ratio": self.decode_ratio,
            "ouro_floor_bytes": self.ouro_floor_bytes,
            "melt_floor_bytes": self.melt_floor_bytes,
            "ouro_floor_seconds": self.floor_seconds("ouro"),
            "melt_floor_seconds": self.floor_seconds("melt"),
            "ouro_x_floor": self.x_floor("ouro"),
            "melt_x_floor": self.x_floor("melt"),
        }


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
    decode_path: str = "eager"  # the engine's resolved path: eager, static, graph or compiled
    kv_dtype: str = "auto"
    bandwidth: float = 0.0  # bytes/s, the median of every round's copy bandwidth

    @property
    def startup_seconds(self) -> dict[str, float]:
        """The decode path's start-up per model: the compilation or capture of its shapes (all loop counts)."""
        return {name: sum(getattr(r, name).startup_seconds for r in self.rows) for name in ("ouro", "melt")}

    def to_dict(self) -> dict[str, Any]:
        return {
            "ouro_source": self.ouro_source,
            "melt_source": self.melt_source,
            "device": self.device,
            "dtype": self.dtype,
            "batch": self.batch,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "decode_path": self.decode_path,
            "startup_seconds": self.startup_seconds,
            "kv_dtype": self.kv_dtype,
            "bandwidth_bytes_per_s": self.bandwidth,
            "rows": [r.to_dict() for r in self.rows],
        }


def speed_profile(args: SpeedProfileArgs, progress: Progress | None = None) -> SpeedReport:
    """Prefill and decode tokens/s of the Ouro source and its MELT conversion (same weights, same
    random prompt), at every loop count, after one short warm-up run per model, and each decode
    step against its bandwidth floor (the copy bandwidth measured in every round). Each model
    prefills with its own default chunking (Ouro: the whole prompt; MELT: its chunk size) unless
    ``chunk_size`` sets both. ``decode``: the engine's decode path; a fixed-shape one's start-up (its
    first calls, before the timed runs: compilation or CUDA-graph capture) is reported apart."""
    check_loops(args.loops)
    check_positive("prompt tokens", [args.prompt_tokens])
    check_positive("new tokens", [args.new_tokens])
    check_positive("batch", [args.batch])
    check_positive("rounds", [args.rounds])
    kv = args.kv_format()
    EngineOptions(kv_dtype=kv, decode=args.decode)  # a path that cannot read these rows fails now
    device = resolve_device(args.device)
    pair = load_pair(args.checkpoint, dtype=args.dtype, device=device)
    seq_len = args.prompt_tokens + args.new_tokens
    for model in (pair.ouro, pair.melt):  # warm-up: first-call overheads out of the timings
        measure_generation(
            model,
            loops=1,
            seq_len=min(seq_len, 8),
            decode_tokens=min(args.new_tokens, 4),
            batch=args.batch,
            chunk_size=args.chunk_size,
            track_memory=False,
            kv_dtype=kv,
        )
    rows = []
    models = (("ouro", pair.ouro), ("melt", pair.melt))
    bandwidths: list[float] = []
    for loops in args.loops:
        runs: dict[str, list[MeasuredRun]] = {"ouro": [], "melt": []}
        for r in range(args.rounds):  # interleaved, alternating who goes first: noise hits both alike
            bandwidths.append(copy_bandwidth(pair.ouro.device))
            for name, model in models if r % 2 == 0 else models[::-1]:
                if progress is not None:
                    what = "starting up and timing" if args.decode not in ("auto", "eager") and r == 0 else "timing"
                    progress(f"{what} {name}: {plural(loops, 'loop')}, round {r + 1} of {args.rounds}")
                runs[name].append(
                    measure_generation(
                        model,
                        loops=loops,
                        seq_len=seq_len,
                        batch=args.batch,
                        decode_tokens=args.new_tokens,
                        chunk_size=args.chunk_size,
                        seed=args.seed,
                        track_memory=False,
                        kv_dtype=kv,
                        decode=args.decode,
                    )
                )
        # the KV rows a decode step attends, on average over the timed steps
        positions = args.prompt_tokens + (args.new_tokens + 1) / 2
        floors = {name: decode_step_bytes(model, loops, args.batch, positions, kv) for name, model in models}
        rows.append(
            SpeedRow(
                loops,
                _median_run(runs["ouro"]),
                _median_run(runs["melt"]),
                ouro_floor_bytes=floors["ouro"],
                melt_floor_bytes=floors["melt"],
                bandwidth=statistics.median(bandwidths[-args.rounds :]),
            )
        )
    return SpeedReport(
        ouro_source=pair.ouro_source,
        melt_source=pair.melt_source,
        device=str(device),
        dtype=dtype_name(pair.ouro.dtype),
        batch=args.batch,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        rows=rows,
        decode_path=rows[0].ouro.decode_path,
        kv_dtype=args.kv_dtype,
        bandwidth=statistics.median(bandwidths),
    )


def decode_step_bytes(model: nn.Module, loops: int, batch: int, positions: float, kv: KVFormat) -> int:
    """The bytes one decode step of ``batch`` sequences must read: the layer stack's weights once
    per loop, the rest of the model (final norm, exit gate, LM head) once, one embedding row per
    sequence, and the KV rows of ``positions`` positions per sequence (in the cache's format)."""
    layers = sum(p.nbytes for name, p in model.named_parameters() if name.startswith("model.layers."))
    embedding = model.model.embed_tokens.weight
    rest = sum(p.nbytes for p in model.parameters()) - layers - embedding.nbytes
    kv_bytes = model.config.kv_bytes_per_token(model.dtype, loops, kv) * positions * batch
    return int(layers * loops + rest + embedding[0].nbytes * batch + kv_bytes)


def copy_bandwidth(device: torch.device, nbytes: int = 2**26, repeats: int = 5) -> float:
    """Bytes per second a large on-device copy moves (read + write; the median of ``repeats``):
    what streaming weights and KV rows can reach on this device, beyond any CPU cache."""
    source = torch.empty(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    for _ in range(2):
        target.copy_(source)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        target.copy_(source)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(times)


def _median_run(runs: list[MeasuredRun]) -> MeasuredRun:
    """One run with the median prefill and the median decode time of ``runs`` and the start-up of
    the one that compiled (the first; later ones find torch's caches)."""
    return replace(
        runs[0],
        prefill_seconds=statistics.median(r.prefill_seconds for r in runs),
        decode_seconds=statistics.median(r.decode_seconds for r in runs),
        startup_seconds=max(r.startup_seconds for r in runs),
    )
