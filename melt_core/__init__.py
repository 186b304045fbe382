"""melt core library: looped language models (Ouro) and their memory-efficient MELT conversion."""

from importlib.metadata import PackageNotFoundError, version

from .checkpoint import load_config, load_model, save_checkpoint
from .config import MeltConfig, MeltSettings, OuroConfig
from .errors import MeltError
from .melt import MeltForCausalLM
from .ouro import LoopLMOutput, OuroForCausalLM
from .tokenizer import load_tokenizer

try:
    __version__ = version("melt")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "LoopLMOutput", "MeltConfig", "MeltError", "MeltForCausalLM", "MeltSettings", "OuroConfig", "OuroForCausalLM",
    "__version__",
    "load_config", "load_model", "load_tokenizer", "save_checkpoint",
]
