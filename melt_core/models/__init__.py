"""The model code: configs, the shared block, KV policies and row stores, Ouro and MELT.

No I/O, no training, no sampling here: loading lives in ``melt_core.checkpoints``, generation in
``melt_core.inference``, training in ``melt_core.training``.
"""

from .config import MeltConfig, MeltSettings, OuroConfig
from .kv import KVCache
from .melt import MeltForCausalLM
from .ouro import LoopLMOutput, OuroForCausalLM
from .registry import MODEL_TYPES, config_from_dict, is_melt, is_ouro

__all__ = [
    "KVCache",
    "LoopLMOutput",
    "MODEL_TYPES",
    "MeltConfig",
    "MeltForCausalLM",
    "MeltSettings",
    "OuroConfig",
    "OuroForCausalLM",
    "config_from_dict",
    "is_melt",
    "is_ouro",
]
