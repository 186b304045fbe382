"""The one place that knows a model's kind: ``model_type`` -> (config class, model class)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from .config import MeltConfig, OuroConfig
from .melt import MeltForCausalLM
from .ouro import OuroForCausalLM

# Later model families register here.
MODEL_TYPES: dict[str, tuple[type[OuroConfig], type[nn.Module]]] = {
    "ouro": (OuroConfig, OuroForCausalLM),
    "melt": (MeltConfig, MeltForCausalLM),
}


def model_type_of(obj: Any) -> str:
    """The ``model_type`` of a model, a config or a config.json dict."""
    if isinstance(obj, dict):
        return obj.get("model_type")
    config = getattr(obj, "config", obj)
    return config.model_type


def is_melt(obj: Any) -> bool:
    """Whether a model, config or config.json dict is MELT's."""
    return model_type_of(obj) == "melt"


def is_ouro(obj: Any) -> bool:
    """Whether a model, config or config.json dict is a plain Ouro LoopLM's."""
    return model_type_of(obj) == "ouro"


def config_from_dict(raw: dict[str, Any], source: str = "config") -> OuroConfig:
    """Dispatch on ``model_type`` to the registered config class."""
    model_type = raw.get("model_type")
    if model_type is None:
        raise ConfigError(f"{source} has no model_type; expected one of {sorted(MODEL_TYPES)}")
    if not isinstance(model_type, str) or model_type not in MODEL_TYPES:
        raise UnsupportedModelError(
            f"{source} has model_type {model_type!r}; "
            f"melt reads {' and '.join(repr(t) for t in MODEL_TYPES)} checkpoints"
        )
    config_cls, _ = MODEL_TYPES[model_type]
    try:
        return config_cls.from_dict(raw)
    except (ConfigError, UnsupportedModelError) as e:
        raise type(e)(f"{source}: {e}") from e


def model_class(config: OuroConfig) -> type[nn.Module]:
    return MODEL_TYPES[config.model_type][1]
