"""melt core library: looped language models (Ouro) and their memory-efficient MELT conversion.

Layers, bottom up (each imports only those below it):
  errors, dtypes, runtime, data   small shared modules
  cache/         cache layouts (the slot of each (loop, layer)), row stores, KVCache
  models/        configs, the shared block, KV policies, Ouro and MELT (no I/O)
  checkpoints/   load/save, convert, presets, tokenizer, built-in and random checkpoints
  inference/     the engine (the one prefill + decode loop, its decode paths), sampling, text, ``generate_text``
  evaluation/    per-loop held-out loss and teacher agreement
  training/      the accelerate loop, losses, MELT's two phases, LoopLM pretraining
  profiling/     analytic and measured memory, Ouro vs MELT speed
  integrations/  melt models in transformers (AutoModelForCausalLM) and lm-evaluation-harness
  quickstart     the whole pipeline on the built-in example model

The names below and the subpackages are imported when first used (``melt_core.load_model``,
``from melt_core import MeltConfig``, ``melt_core.training``), so that ``import melt_core`` is quick.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from .errors import MeltError
from .integrations.autoregister import install as _register_with_transformers

if TYPE_CHECKING:
    from .checkpoints import load_config, load_model, load_tokenizer, save_checkpoint
    from .models import LoopLMOutput, MeltConfig, MeltForCausalLM, MeltSettings, OuroConfig, OuroForCausalLM

_LAZY = {
    **dict.fromkeys(("load_config", "load_model", "load_tokenizer", "save_checkpoint"), "checkpoints"),
    **dict.fromkeys(
        ("LoopLMOutput", "MeltConfig", "MeltForCausalLM", "MeltSettings", "OuroConfig", "OuroForCausalLM"), "models"
    ),
}


def __getattr__(name: str) -> Any:
    """The names of ``__all__`` and the subpackages, imported on first use."""
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = import_module(f"{__name__}.{_LAZY.get(name, name)}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{_LAZY.get(name, name)}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(module, name) if name in _LAZY else module
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


# AutoModelForCausalLM.from_pretrained(DIR) loads ouro and melt checkpoints (registered once transformers'
# auto classes are imported: importing transformers' modeling code here would make every melt command slow)
_register_with_transformers()

try:
    __version__ = version("melt")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "LoopLMOutput",
    "MeltConfig",
    "MeltError",
    "MeltForCausalLM",
    "MeltSettings",
    "OuroConfig",
    "OuroForCausalLM",
    "__version__",
    "load_config",
    "load_model",
    "load_tokenizer",
    "save_checkpoint",
]
