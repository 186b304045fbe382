"""melt core library: looped language models (Ouro) and their memory-efficient MELT conversion.

Layers, bottom up (each imports only those below it):
  errors, dtypes, runtime, data   small shared modules
  models/        configs, the shared block, KV policies and row stores, Ouro and MELT (no I/O)
  checkpoints/   load/save, convert, presets, tokenizer, built-in and random checkpoints
  inference/     sampling, the decode loop, text streaming, ``generate_text``
  evaluation/    per-loop held-out loss and teacher agreement
  training/      the accelerate loop, losses, MELT's two phases, LoopLM pretraining
  profiling/     analytic and measured memory, Ouro vs MELT speed
  integrations/  melt models in transformers (AutoModelForCausalLM) and lm-evaluation-harness
  quickstart     the whole pipeline on the built-in example model
"""

from importlib.metadata import PackageNotFoundError, version

from .checkpoints import load_config, load_model, load_tokenizer, save_checkpoint
from .errors import MeltError
from .integrations.hf import register as _register_with_transformers
from .models import LoopLMOutput, MeltConfig, MeltForCausalLM, MeltSettings, OuroConfig, OuroForCausalLM

_register_with_transformers()  # AutoModelForCausalLM.from_pretrained(DIR) loads ouro and melt checkpoints

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
