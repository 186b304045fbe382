"""Model configuration built from a Hugging Face ``config.json``.

``OuroConfig`` keeps HF field names so that a config round-trips: every key melt does not use is
kept in ``extra`` and written back unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..cache.layout import MELT_LAYOUTS, CacheLayout, cache_layout
from ..cache.quantized import KVFormat
from ..errors import ConfigError, InvalidArgumentError, UnsupportedModelError
from .update_rules import UPDATE_RULES

# Keys melt writes itself and does not keep in ``extra``.
_DERIVED_KEYS = {"model_type", "architectures"}
MAX_SIZE = 2**31 - 1  # the largest size field (layers, widths, vocabulary, positions) melt accepts


def _is_number(value: Any) -> bool:
    """A finite JSON number (not a bool, a string or NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _kind(value: Any) -> str:
    """How a wrong value reads in a message: ``'32'`` (a string), ``a JSON array``."""
    if isinstance(value, (list, dict)):
        return f"a JSON {'array' if isinstance(value, list) else 'object'}"
    return repr(value)


def validate_loops(loops: int, name: str = "loops") -> int:
    """The one check of a loop count: a positive integer."""
    if isinstance(loops, bool) or not isinstance(loops, int) or loops < 1:
        raise InvalidArgumentError(f"{name} must be >= 1, got {loops!r}")
    return loops


@dataclass
class OuroConfig:
    """Ouro (LoopLM) hyper-parameters; docs/ouro-format.md ("config.json") lists the real values."""

    vocab_size: int = 49152
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 65536
    rope_theta: float = 1_000_000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    total_ut_steps: int = 4
    early_exit_threshold: float | None = 1.0
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 0
    pad_token_id: int | None = None
    torch_dtype: str | None = "bfloat16"
    extra: dict[str, Any] = field(default_factory=dict)

    model_type = "ouro"
    architectures = ["OuroForCausalLM"]

    def __post_init__(self) -> None:
        """Every field is checked for type and range here, so that a hand-edited config.json fails
        as one message naming the field, never deep in model code."""
        sizes = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "total_ut_steps",
            "max_position_embeddings",
        )
        for name in sizes:
            value = getattr(self, name)
            if value is None and name in ("num_key_value_heads", "head_dim"):
                continue  # derived below
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_SIZE:
                raise ConfigError(f"config field {name} must be an integer in 1..{MAX_SIZE}, got {_kind(value)}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
            if self.head_dim < 1:
                raise ConfigError(
                    f"config field hidden_size ({self.hidden_size}) must be at least num_attention_heads "
                    f"({self.num_attention_heads}), or set head_dim"
                )
        for name in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, name)
            if not _is_number(value) or value <= 0:
                raise ConfigError(f"config field {name} must be a positive number, got {_kind(value)}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise ConfigError(
                f"config field rope_scaling must be a JSON object or null, got {_kind(self.rope_scaling)}"
            )
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError(
                f"config field tie_word_embeddings must be true or false, got {_kind(self.tie_word_embeddings)}"
            )
        threshold = self.early_exit_threshold
        if threshold is not None and not (_is_number(threshold) and 0 <= threshold <= 1):
            raise ConfigError(
                f"config field early_exit_threshold must be a number in [0, 1] or null, got {_kind(threshold)}"
            )
        for name in ("bos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not _is_token_id(value):
                raise ConfigError(
                    f"config field {name} must be a token id (an integer >= 0) or null, got {_kind(value)}"
                )
        eos = self.eos_token_id
        if eos is not None and not (_is_token_id(eos) or (isinstance(eos, list) and all(map(_is_token_id, eos)))):
            raise ConfigError(
                f"config field eos_token_id must be a token id, a list of them, or null, got {_kind(eos)}"
            )
        if self.pad_token_id is not None and self.pad_token_id >= self.vocab_size:
            raise ConfigError(
                f"config field pad_token_id {self.pad_token_id} is not in the vocabulary (vocab_size {self.vocab_size})"
            )
        if self.torch_dtype is not None and not isinstance(self.torch_dtype, str):
            raise ConfigError(
                f'config field torch_dtype must be a string such as "bfloat16", got {_kind(self.torch_dtype)}'
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        rope_type = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type", "default"))
        if rope_type != "default":
            raise UnsupportedModelError(
                f"rope_scaling {self.rope_scaling!r} is not supported; melt implements default RoPE only"
            )
        if self.hidden_act != "silu":
            raise UnsupportedModelError(f"hidden_act {self.hidden_act!r} is not supported; Ouro uses 'silu'")
        if self.tie_word_embeddings:
            raise UnsupportedModelError("tie_word_embeddings=true is not supported; Ouro stores lm_head separately")
        # carried in ``extra``: melt computes full attention in every layer, so anything else is refused
        if self.extra.get("use_sliding_window"):
            raise UnsupportedModelError("use_sliding_window=true is not supported; melt computes full attention")
        layer_types = self.extra.get("layer_types")
        if layer_types is not None and (
            not isinstance(layer_types, list) or any(t != "full_attention" for t in layer_types)
        ):
            raise UnsupportedModelError(
                f"layer_types must all be 'full_attention' (melt computes full attention in every layer), "
                f"got {str(layer_types)[:80]}"
            )

    # --- derived sizes -------------------------------------------------------------------------
    @property
    def kv_width(self) -> int:
        """Width of one K (or V) row: kv_heads * head_dim."""
        return self.num_key_value_heads * self.head_dim

    def resolve_loops(self, loops: int | None) -> int:
        """The loop count of a forward: ``loops``, or the trained ``total_ut_steps`` when None."""
        return self.total_ut_steps if loops is None else validate_loops(loops)

    def cache_layout(self) -> CacheLayout:
        """Which slot each (loop, layer) writes (``cache.layout``): Ouro's ``per_loop``."""
        return cache_layout("per_loop", self.num_hidden_layers)

    def kv_slots_per_loop(self, loops: int | None = None) -> list[int]:
        """Cache slots (one K and one V row per token each) that every loop adds, by the layout:
        Ouro keeps one per (loop, layer), so each loop adds a layer stack."""
        return self.cache_layout().slots_per_loop(self.resolve_loops(loops))

    def kv_bytes_per_loop(self, dtype: torch.dtype, loops: int | None = None, kv: KVFormat | None = None) -> list[int]:
        """KV bytes per token that each loop adds; ``kv``: how rows are stored (default: in ``dtype``)."""
        row = 2 * self.num_key_value_heads * (kv or KVFormat()).row_bytes(self.head_dim, dtype)  # K and V
        return [slots * row for slots in self.kv_slots_per_loop(loops)]

    def kv_cache_bytes_per_loop(
        self, dtype: torch.dtype, loops: int | None, kv: KVFormat | None, positions: int, batch: int = 1
    ) -> list[int]:
        """Exact bytes each loop adds to a cache of ``positions`` positions and ``batch`` rows: the
        rows (``kv_bytes_per_loop``) plus a quantised format's full-precision residual ring."""
        kv = kv or KVFormat()
        ring = 2 * self.num_key_value_heads * batch * kv.window_bytes(self.head_dim, dtype, positions)  # per slot
        per_token = self.kv_bytes_per_loop(dtype, loops, kv)
        return [
            b * positions * batch + slots * ring
            for b, slots in zip(per_token, self.kv_slots_per_loop(loops), strict=True)
        ]

    def kv_bytes_per_token(self, dtype: torch.dtype, loops: int | None = None, kv: KVFormat | None = None) -> int:
        """KV cache bytes per token at ``loops`` (default: the trained loop count)."""
        return sum(self.kv_bytes_per_loop(dtype, loops, kv))

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    # --- (de)serialisation ---------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)} - {"extra"}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> OuroConfig:
        """Build from a config.json dict; unknown keys go to ``extra``."""
        raw = dict(raw)
        if "torch_dtype" not in raw and "dtype" in raw:  # transformers >= 4.56 writes "dtype"
            raw["torch_dtype"] = raw["dtype"]
        known = {k: v for k, v in raw.items() if k in cls.field_names()}
        extra = {k: v for k, v in raw.items() if k not in cls.field_names() and k not in _DERIVED_KEYS}
        try:
            return cls(**known, extra=extra)
        except TypeError as e:  # pragma: no cover - defensive, all keys are filtered
            raise ConfigError(f"invalid config: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"architectures": list(self.architectures), "model_type": self.model_type}
        out.update(self.extra)
        for name in sorted(self.field_names()):
            out[name] = getattr(self, name)
        return out


MELT_POLICIES = tuple(UPDATE_RULES)
MELT_H0 = ("first_input", "zeros")


@dataclass
class MeltSettings:
    """The MELT section of a MELT config.json (docs/melt-method.md: the method and melt's choices).

    policy: how a token's shared KV row is updated from loop to loop — ``gate`` (MELT,
      element-wise learned gate), ``scalar`` (one learned gate value per layer and token), or the
      training-free ``last`` (z = 0), ``first`` (z = 1: the first loop's row), ``mean`` (running
      mean over loops), ``ema`` (EMA over loops).
    layout: the cache layout (``cache.layout``) — ``shared`` (MELT: one slot per layer, every loop
      overwrites it) or ``first_then_shared`` (loop 1's rows kept apart, later loops share a slot:
      twice the memory).
    h0: the latent state before loop 1 for ``gate``/``scalar``: ``first_input`` (h = u at loop 1,
      so loop 1 writes Ouro's loop-1 row) or ``zeros``. The other policies always start from u, so
      ``zeros`` with them is an error.
    z0: initial gate value (W_z = U_z = 0, b_z = logit(z0)) used by ``melt convert``.
    chunk_size: tokens per chunk in training and prefill (docs/melt-method.md, "Chunk-wise computation").
    ema_factor: weight of the newest loop for ``ema`` (h = (1 - f) h_prev + f u).
    source: the Ouro checkpoint this model was converted from (the default distillation teacher).
    """

    policy: str = "gate"
    layout: str = "shared"
    h0: str = "first_input"
    z0: float = 0.1
    chunk_size: int = 500
    ema_factor: float = 0.2
    source: str | None = None

    def __post_init__(self) -> None:
        for name in ("z0", "ema_factor"):
            if not _is_number(getattr(self, name)):
                raise ConfigError(f"melt.{name} must be a number, got {_kind(getattr(self, name))}")
        if not isinstance(self.policy, str) or self.policy not in MELT_POLICIES:
            raise ConfigError(f"melt.policy must be one of {', '.join(MELT_POLICIES)}, got {self.policy!r}")
        if not isinstance(self.layout, str) or self.layout not in MELT_LAYOUTS:
            raise ConfigError(f"melt.layout must be one of {', '.join(MELT_LAYOUTS)}, got {self.layout!r}")
        if not isinstance(self.h0, str) or self.h0 not in MELT_H0:
            raise ConfigError(f"melt.h0 must be one of {', '.join(MELT_H0)}, got {self.h0!r}")
        if self.h0 != "first_input" and not self.learned:
            raise ConfigError(
                f"melt.h0 {self.h0!r} applies to learned gates (gate, scalar); "
                f"policy {self.policy!r} always starts from the loop's input"
            )
        if not 0.0 < self.z0 < 1.0:
            raise ConfigError(f"melt.z0 must be strictly between 0 and 1, got {self.z0}")
        if not isinstance(self.chunk_size, int) or isinstance(self.chunk_size, bool) or self.chunk_size < 1:
            raise ConfigError(f"melt.chunk_size must be a positive integer, got {_kind(self.chunk_size)}")
        if not 0.0 < self.ema_factor <= 1.0:
            raise ConfigError(f"melt.ema_factor must be in (0, 1], got {self.ema_factor}")
        if self.source is not None and not isinstance(self.source, str):
            raise ConfigError(f"melt.source must be a path (a string) or null, got {_kind(self.source)}")

    @property
    def learned(self) -> bool:
        """Whether the policy has a learned gate (``gate``, ``scalar``)."""
        return UPDATE_RULES[self.policy].learned()


@dataclass
class MeltConfig(OuroConfig):
    """An Ouro config plus the MELT section; ``model_type: "melt"``."""

    melt: MeltSettings = field(default_factory=MeltSettings)

    model_type = "melt"
    architectures = ["MeltForCausalLM"]

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.melt, (dict, MeltSettings)):
            raise ConfigError(
                f'config field melt must be a JSON object of MELT settings ({{"policy": "gate", ...}}), '
                f"got {_kind(self.melt)}"
            )
        if isinstance(self.melt, dict):
            unknown = set(self.melt) - {f.name for f in dataclasses.fields(MeltSettings)}
            if unknown:
                raise ConfigError(f"unknown key(s) in the melt section: {', '.join(sorted(unknown))}")
            self.melt = MeltSettings(**self.melt)

    def cache_layout(self) -> CacheLayout:
        """The MELT section's layout: ``shared`` (one slot per layer, created at loop 1 and
        overwritten by later loops) or ``first_then_shared``."""
        return cache_layout(self.melt.layout, self.num_hidden_layers)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("auto_map", None)  # Ouro's remote code: trust_remote_code=True would build an Ouro model
        out["melt"] = dataclasses.asdict(self.melt)
        return out

    @classmethod
    def from_ouro(cls, ouro: OuroConfig, settings: MeltSettings) -> MeltConfig:
        fields = {name: getattr(ouro, name) for name in OuroConfig.field_names()}
        extra = {k: v for k, v in ouro.extra.items() if k != "auto_map"}
        return cls(**fields, extra=extra, melt=settings)
