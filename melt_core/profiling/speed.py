"""``melt profile speed``: prefill and decode tokens/s of an Ouro model and its MELT conversion."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..dtypes import dtype_name
from ..runtime import resolve_device
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
        return {
            "loops": self.loops,
            "ouro": self.ouro.to_dict(),
            "melt": self.melt.to_dict(),
            "prefill_ratio": self.prefill_ratio,
            "decode_ratio": self.decode_ratio,
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

    def to_dict(self) -> dict[str, Any]:
        return {
            "ouro_source": self.ouro_source,
            "melt_source": self.melt_source,
            "device": self.device,
            "dtype": self.dtype,
            "batch": self.batch,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "rows": [r.to_dict() for r in self.rows],
        }


def speed_profile(args: SpeedProfileArgs, progress: Progress | None = None) -> SpeedReport:
    """Prefill and decode tokens/s of the Ouro source and its MELT conversion (same weights, same
    random prompt), at every loop count, after one short warm-up run per model. Each model
    prefills with its own default chunking (Ouro: the whole prompt; MELT: its chunk size) unless
    ``chunk_size`` sets both."""
    check_loops(args.loops)
    check_positive("prompt tokens", [args.prompt_tokens])
    check_positive("new tokens", [args.new_tokens])
    check_positive("batch", [args.batch])
    check_positive("rounds", [args.rounds])
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
        )
    rows = []
    models = (("ouro", pair.ouro), ("melt", pair.melt))
    for loops in args.loops:
        runs: dict[str, list[MeasuredRun]] = {"ouro": [], "melt": []}
        for r in range(args.rounds):  # interleaved, alternating who goes first: noise hits both alike
            for name, model in models if r % 2 == 0 else models[::-1]:
                if progress is not None:
                    progress(f"timing {name}: {plural(loops, 'loop')}, round {r + 1} of {args.rounds}")
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
                    )
                )
        rows.append(SpeedRow(loops, _median_run(runs["ouro"]), _median_run(runs["melt"])))
    return SpeedReport(
        ouro_source=pair.ouro_source,
        melt_source=pair.melt_source,
        device=str(device),
        dtype=dtype_name(pair.ouro.dtype),
        batch=args.batch,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        rows=rows,
    )


def _median_run(runs: list[MeasuredRun]) -> MeasuredRun:
    """One run with the median prefill and the median decode time of ``runs``."""
    return replace(
        runs[0],
        prefill_seconds=statistics.median(r.prefill_seconds for r in runs),
        decode_seconds=statistics.median(r.decode_seconds for r in runs),
    )
