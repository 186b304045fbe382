"""Checkpoints on disk: Hugging Face directories (config.json + safetensors + tokenizer), read and
written by melt itself; Ouro -> MELT conversion; the real configs as presets; the checkpoints
shipped with the package; small random checkpoints; what ``melt info`` reports; safe output dirs."""

from ..outputs import atomic_directory, fresh_output_dir
from .convert import convert_ouro_to_melt, melt_from_ouro
from .io import build_model, checkpoint_dir, load_config, load_model, read_config_dict, save_checkpoint
from .tokenizer import load_tokenizer

__all__ = [
    "atomic_directory",
    "build_model",
    "checkpoint_dir",
    "convert_ouro_to_melt",
    "fresh_output_dir",
    "load_config",
    "load_model",
    "load_tokenizer",
    "melt_from_ouro",
    "read_config_dict",
    "save_checkpoint",
]
