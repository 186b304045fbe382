"""The real Ouro configs (OURO.md §2), as their config.json files hold them.

Used for sizing without weights: ``build_model(config, "meta")`` allocates nothing.
"""

from __future__ import annotations

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
