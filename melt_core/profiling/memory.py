"""``melt profile memory``: weights, gates and KV cache of Ouro vs MELT vs a plain model.

Analytic memory comes from the configs alone (models built on the ``meta`` device): weights =
parameters x dtype size, KV cache = the config's bytes per token and loop x sequence length x
batch, with Ouro's KV per token linear in the loop count and MELT's constant. It reproduces the
MELT paper's Table 2. ``--measure`` attaches a real run (``profiling.measure``) to every entry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..cache.quantized import kv_format
from ..checkpoints import load_config
from ..checkpoints.presets import PRESET_NAMES, REFERENCE_MODELS, ReferenceModel, preset_config, resolve_preset
from ..dtypes import dtype_bytes, dtype_name, dtype_or_stored, parse_dtype
from ..errors import InvalidArgumentError
from ..models import OuroConfig, config_from_dict, is_melt
from ..models.config import validate_loops
from ..runtime import resolve_device
from ..words import plural
from .measure import MeasuredRun, measure_generation
from .pairs import config_pair, load_pair, parameter_counts

Progress = Callable[[str], None]


def check_loops(values: Sequence[int]) -> None:
    if not values:
        raise InvalidArgumentError("loops needs at least one value")
    for loops in values:
        validate_loops(loops)


@dataclass
class MemoryEntry:
    """Memory of one model at one (loops, sequence length, batch). ``model``: ``ouro``, ``melt``,
    ``plain`` (the same layers run once, no exit gate) or ``reference`` (a plain model of about the
    preset's size, e.g. Qwen3-1.7B, its KV cache in ``dtype``). Bytes are exact; GB = 1e9 bytes.
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
    dtype: str = "auto"  # auto: the checkpoint's (a preset's: bf16)
    measure: bool = False
    device: str = "auto"
    chunk_size: int | None = None
    decode_tokens: int = 1
    kv_dtype: str = "auto"  # how cache rows are stored (auto: --dtype); the same for every model
    kv_group_size: int | None = (
        None  # channels per scale for int8 / int4 (None: the largest even divisor of head_dim up to 32)
    )
    kv_residual: int = 0  # int8 / int4: the most recent positions kept in full precision


@dataclass
class MemoryReport:
    source: str
    dtype: str
    kv_dtype: str
    batch: int
    kv_bytes_per_token: dict[str, int]  # Ouro per loop, MELT (any loop count), plain
    entries: list[MemoryEntry] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "dtype": self.dtype,
            "kv_dtype": self.kv_dtype,
            "batch": self.batch,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "entries": [e.to_dict() for e in self.entries],
        }


def check_positive(name: str, values: Sequence[int]) -> None:
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
    check_positive("seq-len", args.seq_lens)
    check_positive("batch", [args.batch])
    check_loops(args.loops)
    reference: ReferenceModel | None = None
    if args.preset is not None:
        key = resolve_preset(args.preset)
        config = config_from_dict(preset_config(key), source=f"preset {key}")
        ouro_name, melt_name = PRESET_NAMES[key]
        source, reference = key, REFERENCE_MODELS[key]
    else:
        config = load_config(args.checkpoint)
        ouro_name, melt_name = ("Ouro (base)", "MELT") if is_melt(config) else ("Ouro", "MELT")
        source = str(args.checkpoint)
    dtype = dtype_or_stored(args.dtype, parse_dtype(config.torch_dtype or "bfloat16"))
    ouro_cfg, melt_cfg = config_pair(config)
    limit = ouro_cfg.max_position_embeddings
    too_long = [s for s in args.seq_lens if s > limit]
    if too_long:
        raise InvalidArgumentError(
            f"sequence length {too_long[0]} exceeds the model's maximum {limit} (max_position_embeddings)"
        )
    nbytes = dtype_bytes(dtype)
    ouro_params, _ = parameter_counts(ouro_cfg)
    melt_params, gate_params = parameter_counts(melt_cfg)
    plain_params = ouro_params - (ouro_cfg.hidden_size + 1)  # no exit gate
    N = ouro_cfg.num_hidden_layers
    kv = kv_format(args.kv_dtype, args.kv_group_size, args.kv_residual)
    if kv.quant is not None and kv.quant.group_size and ouro_cfg.head_dim % kv.quant.group_size:
        raise InvalidArgumentError(f"--kv-group-size {kv.quant.group_size} must divide head_dim {ouro_cfg.head_dim}")
    report = MemoryReport(
        source=source,
        dtype=dtype_name(dtype),
        kv_dtype=args.kv_dtype,
        batch=args.batch,
        kv_bytes_per_token={
            "ouro_per_loop": ouro_cfg.kv_bytes_per_token(dtype, 1, kv),
            "melt": melt_cfg.kv_bytes_per_token(dtype, kv=kv),
            "plain": ouro_cfg.kv_bytes_per_token(dtype, 1, kv),
        },
    )

    def kv_per_loop(config: OuroConfig, loops: int, seq_len: int) -> list[int]:
        return config.kv_cache_bytes_per_loop(dtype, loops, kv, seq_len, args.batch)

    def entry(
        model: str, name: str, loops: int, seq_len: int, params: int, gates: int, per_loop: list[int]
    ) -> MemoryEntry:
        weights, kv = params * nbytes, sum(per_loop)
        return MemoryEntry(
            model=model,
            name=name,
            loops=loops,
            seq_len=seq_len,
            batch=args.batch,
            parameters=params,
            gate_parameters=gates,
            weights_bytes=weights,
            gate_bytes=gates * nbytes,
            kv_cache_bytes=kv,
            kv_cache_bytes_per_loop=per_loop,
            total_bytes=weights + kv,
        )

    for seq_len in args.seq_lens:
        report.entries.append(
            entry("plain", f"plain {N}-layer", 1, seq_len, plain_params, 0, kv_per_loop(ouro_cfg, 1, seq_len))
        )
        if reference is not None:
            ref_kv = reference.kv_bytes_per_token(nbytes) * seq_len * args.batch
            name = f"{reference.name} ({reference.num_kv_heads} KV heads, {dtype_name(dtype)} KV)"
            report.entries.append(entry("reference", name, 1, seq_len, reference.parameters(), 0, [ref_kv]))
        for loops in args.loops:
            report.entries.append(
                entry("ouro", ouro_name, loops, seq_len, ouro_params, 0, kv_per_loop(ouro_cfg, loops, seq_len))
            )
            report.entries.append(
                entry(
                    "melt", melt_name, loops, seq_len, melt_params, gate_params, kv_per_loop(melt_cfg, loops, seq_len)
                )
            )
    if args.measure:
        device = resolve_device(args.device)
        pair = load_pair(args.checkpoint, dtype=dtype, device=device)
        models = {"ouro": pair.ouro, "melt": pair.melt}
        for e in report.entries:
            if e.model in models:
                if progress is not None:
                    progress(f"measuring {e.name}: {plural(e.loops, 'loop')}, {plural(e.seq_len, 'token')}")
                e.measured = measure_generation(
                    models[e.model],
                    loops=e.loops,
                    seq_len=e.seq_len,
                    batch=args.batch,
                    decode_tokens=args.decode_tokens,
                    chunk_size=args.chunk_size,
                    kv_dtype=kv,
                )
    return report
