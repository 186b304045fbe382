"""Reading and writing Hugging Face checkpoint directories (config.json + safetensors).

Loading is lazy and strict: the model is built on the ``meta`` device from config.json, every
tensor header is checked against it (names and shapes) before any weight is read, then tensors
are read one at a time straight into the requested dtype and device.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_module_tensor_to_device
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedTokenizerFast

from ..dtypes import SAFETENSORS_DTYPES, dtype_name, parse_dtype
from ..errors import (
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    UnsupportedModelError,
    WeightsMismatchError,
)
from ..models import OuroConfig
from ..models.registry import config_from_dict, model_class
from . import builtin
from .files import CONFIG_NAME, INDEX_NAME, TOKENIZER_FILES, WEIGHTS_NAME
from .outputs import atomic_directory
from .tokenizer import save_tokenizer

DEFAULT_MAX_SHARD_SIZE = "5GB"

ALIGNMENT = 64  # bytes: tensors read from a safetensors file can start at any offset; kernels want aligned data


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as its safetensors header describes it."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * torch.empty((), dtype=self.dtype).element_size()


def checkpoint_dir(path: str | os.PathLike) -> Path:
    """The checkpoint directory ``path`` names: a path, or a built-in name such as ``example``."""
    p = builtin.resolve(path)
    if not p.exists():
        raise CheckpointNotFoundError(f"checkpoint directory {p} does not exist")
    if not p.is_dir():
        raise CheckpointNotFoundError(f"{p} is a file; a checkpoint is a directory holding config.json")
    return p


def read_config_dict(path: str | os.PathLike) -> dict[str, Any]:
    """The raw config.json of a checkpoint directory."""
    file = checkpoint_dir(path) / CONFIG_NAME
    if not file.is_file():
        raise CheckpointNotFoundError(f"{file} not found: {file.parent} is not a Hugging Face checkpoint directory")
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{file} must hold a JSON object, found {type(raw).__name__}")
    return raw


def load_config(path: str | os.PathLike) -> OuroConfig:
    """The config of a checkpoint directory (or built-in name), as its model type's config class."""
    return config_from_dict(read_config_dict(path), source=str(checkpoint_dir(path) / CONFIG_NAME))


def build_model(
    config: OuroConfig, device: torch.device | str = "meta", dtype: torch.dtype = torch.float32
) -> nn.Module:
    """An un-loaded model for ``config``: on ``meta`` it allocates nothing (for sizing)."""
    with torch.device(device):
        model = model_class(config)(config)
    return model.to(dtype)


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, copied when its data does not start on an ``ALIGNMENT``-byte boundary."""
    return tensor if tensor.data_ptr() % ALIGNMENT == 0 else tensor.clone()


def _open_safetensors(file: Path) -> Any:
    if not file.is_file():
        raise CheckpointNotFoundError(f"weights file {file} not found")
    try:
        return safe_open(str(file), framework="pt")
    except SafetensorError as e:
        raise CorruptCheckpointError(f"{file} is not a valid safetensors file (truncated or corrupt): {e}") from e


def read_weight_headers(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Name -> header info of every stored tensor (single file or sharded). Empty: no weights."""
    root = checkpoint_dir(path)
    index_file = root / INDEX_NAME
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CorruptCheckpointError(f"{index_file} is not a valid safetensors index: {e}") from e
        files = sorted({root / f for f in weight_map.values()})
    elif (root / WEIGHTS_NAME).is_file():
        weight_map, files = None, [root / WEIGHTS_NAME]
    else:
        return {}
    infos: dict[str, TensorInfo] = {}
    for file in files:
        with _open_safetensors(file) as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                sl = f.get_slice(name)
                code = sl.get_dtype()
                if code not in SAFETENSORS_DTYPES:
                    raise UnsupportedModelError(f"{file}: tensor {name} has dtype {code}; melt reads F32, BF16, F16")
                infos[name] = TensorInfo(file, SAFETENSORS_DTYPES[code], tuple(sl.get_shape()))
    if weight_map is not None:
        listed_elsewhere = {n for n, f in weight_map.items() if n not in infos or infos[n].file != root / f}
        if listed_elsewhere:
            raise CorruptCheckpointError(
                f"{index_file} lists tensors its shards do not hold where it says: {_names(listed_elsewhere)}"
            )
    return infos


def _names(names: set[str] | list[str], limit: int = 5) -> str:
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_weights(model: nn.Module, infos: dict[str, TensorInfo], where: Path) -> None:
    """Strict check: the stored tensors are exactly the model's, with the model's shapes."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = expected.keys() - infos.keys()
    unexpected = infos.keys() - expected.keys()
    if missing:
        raise WeightsMismatchError(f"{where} is missing {len(missing)} tensor(s) the config needs: {_names(missing)}")
    if unexpected:
        raise WeightsMismatchError(f"{where} has {len(unexpected)} unexpected tensor(s): {_names(unexpected)}")
    for name, shape in expected.items():
        if infos[name].shape != shape:
            raise WeightsMismatchError(
                f"{infos[name].file}: tensor {name} has shape {list(infos[name].shape)} "
                f"but {where / CONFIG_NAME} implies {list(shape)}"
            )


def stored_dtype(infos: dict[str, TensorInfo], config: OuroConfig) -> torch.dtype:
    """The dtype the weights are stored in (config's torch_dtype when there are no weights)."""
    if infos:
        return next(iter(infos.values())).dtype
    return parse_dtype(config.torch_dtype or "float32")


def load_model(
    path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> nn.Module:
    """Load a checkpoint directory into a model in eval mode.

    ``dtype``: fp32 / bf16 / fp16, or None for the dtype the weights are stored in.
    ``device="meta"`` builds the model from config.json alone (no weights needed), for sizing.
    ``progress(done_bytes, total_bytes)`` is called after each tensor.
    """
    root = checkpoint_dir(path)
    config = load_config(root)
    infos = read_weight_headers(root)
    target = parse_dtype(dtype) if dtype is not None else stored_dtype(infos, config)
    model = build_model(config, "meta", target)
    model.name_or_path = str(root)
    if str(device) == "meta":
        return model.eval()
    if not infos:
        raise CheckpointNotFoundError(f"{root} has no weights ({WEIGHTS_NAME} or {INDEX_NAME})")
    check_weights(model, infos, root)
    total, done = sum(i.nbytes for i in infos.values()), 0
    by_file: dict[Path, list[str]] = {}
    for name, info in infos.items():
        by_file.setdefault(info.file, []).append(name)
    for file, names in by_file.items():
        with _open_safetensors(file) as f:
            for name in names:
                try:
                    tensor = f.get_tensor(name)
                except SafetensorError as e:
                    raise CorruptCheckpointError(f"{file}: cannot read tensor {name}: {e}") from e
                set_module_tensor_to_device(model, name, device, value=aligned(tensor.to(target)))
                done += infos[name].nbytes
                if progress is not None:
                    progress(done, total)
    return model.eval()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_weights(
    state_dict: dict[str, torch.Tensor],
    out: Path,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    progress: Callable[[int], None] | None = None,
) -> None:
    """``model.safetensors``, or shards + ``model.safetensors.index.json`` above ``max_shard_size``.
    ``progress(nbytes)`` is called after each file with the bytes it holds."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: tensors[n] for n in names}, str(out / filename), metadata={"format": "pt"})
        os.chmod(out / filename, 0o666 & ~_umask())  # safetensors writes 0600; give it a normal file's mode
        if progress is not None:
            progress(sum(tensors[n].nbytes for n in names))
    if split.is_sharded:
        index = {
            "metadata": {**split.metadata, "total_size": sum(t.nbytes for t in tensors.values())},
            "weight_map": split.tensor_to_filename,
        }
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_config(config_dict: dict[str, Any], out: Path) -> None:
    (out / CONFIG_NAME).write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")


def copy_tokenizer_files(src: str | os.PathLike, out: Path) -> list[str]:
    """Copy the tokenizer (and generation config) files that exist in ``src``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, out / name)
            copied.append(name)
    return copied


def save_checkpoint(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | PreTrainedTokenizerFast | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    dtype: str | torch.dtype | None = None,
    force: bool = False,
) -> Path:
    """Write ``model`` as a HF checkpoint directory, atomically: ``out`` appears only once
    everything is written. ``tokenizer``: a directory whose tokenizer files are copied, or a
    tokenizer object to save (with a generation_config.json naming its special tokens).
    ``dtype``: cast the saved tensors (the model itself is not changed)."""
    config = model.config
    state_dict = model.state_dict()
    if dtype is not None:
        target = parse_dtype(dtype)
        state_dict = {k: v.to(target) for k, v in state_dict.items()}
    keep = [tokenizer if isinstance(tokenizer, (str, os.PathLike)) else None, getattr(model, "name_or_path", None)]
    with atomic_directory(out, force=force, keep=keep) as tmp:
        write_weights(state_dict, tmp, max_shard_size)
        config_dict = config.to_dict()
        config_dict["torch_dtype"] = dtype_name(next(iter(state_dict.values())).dtype)
        write_config(config_dict, tmp)
        if isinstance(tokenizer, (str, os.PathLike)):
            copy_tokenizer_files(tokenizer, tmp)
        elif tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
            generation = {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return Path(out)
