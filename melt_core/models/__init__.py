"""The model code: configs, the shared block, KV policies, Ouro and MELT (the cache itself: ``melt_core.cache``).

No I/O, no training, no sampling here: loading lives in ``melt_core.checkpoints``, generation in
``melt_core.inference``, training in ``melt_core.training``.
"""

from ..cache import KVCache
from .config import MeltConfig, MeltSettings, OuroConfig
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
