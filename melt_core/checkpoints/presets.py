"""The real Ouro configs (docs/ouro-format.md, "config.json"), as their config.json files hold them.

Used for sizing without weights: ``build_model(config, "meta")`` allocates nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import InvalidArgumentError


def _ouro_config(num_layers: int) -> dict[str, Any]:
    return {
        "architectures": ["OuroForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_ouro.OuroConfig",
            "AutoModelForCausalLM": "modeling_ouro.OuroForCausalLM",
        },
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 0,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "initializer_range": 0.02,
        "intermediate_size": 5632,
        "layer_types": ["full_attention"] * num_layers,
        "max_position_embeddings": 65536,
        "max_window_layers": num_layers,
        "model_type": "ouro",
        "num_attention_heads": 16,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": 16,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "total_ut_steps": 4,
        "early_exit_threshold": 1.0,
        "transformers_version": "4.55.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 49152,
    }


PRESETS: dict[str, dict[str, Any]] = {
    "ouro-1.4b": _ouro_config(24),
    "ouro-2.6b": _ouro_config(48),
}


# MELT preset names: the MELT conversion of an Ouro preset (memory reports show both models anyway).
MELT_PRESETS = {"melt-1.6b": "ouro-1.4b", "melt-3.1b": "ouro-2.6b"}
# Display names of a preset's Ouro model and its MELT conversion (Ouro + 201M / 403M gate parameters).
PRESET_NAMES = {"ouro-1.4b": ("Ouro-1.4B", "MELT-1.6B"), "ouro-2.6b": ("Ouro-2.6B", "MELT-3.1B")}


@dataclass(frozen=True)
class ReferenceModel:
    """A plain (non-looped) transformer of about a preset's size, from its published config.json:
    what a user would run instead. Qwen3 uses GQA (8 KV heads) and ties its embeddings."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def parameters(self) -> int:
        """Embeddings (tied with the head) + layers (attention, SwiGLU, 2 norms, q/k norms) + final norm."""
        h, d = self.hidden_size, self.head_dim
        attention = h * d * (2 * self.num_heads + 2 * self.num_kv_heads)
        layer = attention + 3 * h * self.intermediate_size + 2 * h + 2 * d
        return self.vocab_size * h + self.num_layers * layer + h

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


# The plain model each preset is compared with (the Ouro paper's own comparisons).
REFERENCE_MODELS = {
    "ouro-1.4b": ReferenceModel("Qwen3-1.7B", 151936, 2048, 6144, 28, 16, 8, 128),
    "ouro-2.6b": ReferenceModel("Qwen3-4B", 151936, 2560, 9728, 36, 32, 8, 128),
}


def resolve_preset(name: str) -> str:
    """An Ouro preset key from an Ouro or MELT preset name (case-insensitive)."""
    key = name.lower()
    key = MELT_PRESETS.get(key, key)
    if key not in PRESETS:
        raise InvalidArgumentError(f"unknown preset {name!r}; choose from {', '.join([*PRESETS, *MELT_PRESETS])}")
    return key


def preset_config(name: str) -> dict[str, Any]:
    """A copy of a preset's Ouro config.json dict, by Ouro or MELT preset name."""
    return dict(PRESETS[resolve_preset(name)])
