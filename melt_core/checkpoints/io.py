"""Reading and writing Hugging Face checkpoint directories (config.json + safetensors).

Loading is lazy and strict: every tensor header is checked against config.json (names and
shapes) before the model is built on the ``meta`` device or any weight is read, then tensors are
read one at a time straight into the requested dtype and device.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.overrides import TorchFunctionMode

from ..dtypes import SAFETENSORS_DTYPES, dtype_name, dtype_or_stored, parse_dtype
from ..errors import (
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    MeltWarning,
    UnsupportedModelError,
    WeightsMismatchError,
)
from ..models import OuroConfig
from ..models.registry import config_from_dict, model_class
from ..models.update_rules import is_gate_parameter
from ..outputs import atomic_directory, writing
from ..runtime import check_fits
from . import builtin
from .files import CONFIG_NAME, INDEX_NAME, TOKENIZER_FILES, WEIGHTS_NAME
from .tokenizer import save_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

DEFAULT_MAX_SHARD_SIZE = "5GB"

ALIGNMENT = 64  # bytes: tensors read from a safetensors file can start at any offset; kernels want aligned data
MAX_JSON_BYTES = 100_000_000  # the largest config, index or safetensors header read (safetensors' own limit)
# A generous bound on the Python objects of one decoder layer built on ``meta``: a model of absurd
# depth is refused before it is built instead of filling the memory with modules.
LAYER_OBJECT_BYTES = 64 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as its safetensors header describes it."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


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
    raw = _read_json(file, ConfigError, "valid JSON")
    if not isinstance(raw, dict):
        raise ConfigError(f"{file} must hold a JSON object, found {type(raw).__name__}")
    return raw


def _read_json(file: Path, error: type[Exception], what: str, data: bytes | None = None) -> Any:
    """The JSON of ``file`` (or its bytes ``data``); anything unreadable, huge or nested too
    deeply for Python's parser is ``error`` naming the file, not a traceback."""
    if data is None:
        if file.stat().st_size > MAX_JSON_BYTES:
            raise error(f"{file} is not {what}: it is larger than {MAX_JSON_BYTES:,} bytes")
        data = file.read_bytes()
    try:
        return json.loads(data)
    except RecursionError:
        raise error(f"{file} is not {what}: its JSON is nested too deeply") from None
    except ValueError as e:  # bad JSON or UTF-8, or an integer too long to convert
        raise error(f"{file} is not {what}: {e}") from e


def load_config(path: str | os.PathLike) -> OuroConfig:
    """The config of a checkpoint directory (or built-in name), as its model type's config class."""
    return config_from_dict(read_config_dict(path), source=str(checkpoint_dir(path) / CONFIG_NAME))


@dataclass(frozen=True)
class ModelLayout:
    """A model's tensors without building it: those outside the layer stack, and those of one decoder
    layer (all layers are alike), read from a one-layer model on ``meta``. Sizing and checking a
    checkpoint this way costs the same whatever its depth."""

    outer: dict[str, tuple[int, ...]]
    layer: dict[str, tuple[int, ...]]  # names after ``model.layers.{i}.``
    num_layers: int
    num_parameters: int
    gate_parameters: int

    PREFIX = "model.layers."

    @property
    def num_tensors(self) -> int:
        return len(self.outer) + self.num_layers * len(self.layer)

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The shape of tensor ``name``; None: the model has no such tensor."""
        if name in self.outer:
            return self.outer[name]
        index, _, rest = name.removeprefix(self.PREFIX).partition(".")
        if name.startswith(self.PREFIX) and index.isdigit() and str(int(index)) == index:
            return self.layer.get(rest) if int(index) < self.num_layers else None
        return None

    def names(self) -> Iterator[str]:
        yield from self.outer
        for i in range(self.num_layers):
            for rest in self.layer:
                yield f"{self.PREFIX}{i}.{rest}"


class _SkipNormalInit(TorchFunctionMode):
    """Skips ``normal_`` (``nn.Embedding``'s initializer): on the meta device there are no values to
    fill, and the meta ``normal_`` imports torch._dynamo, a second of every ``melt info``."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.init.normal_ or func is torch.Tensor.normal_:
            return args[0] if args else kwargs["tensor"]  # the tensor, as normal_ returns it
        return func(*args, **kwargs)


@contextmanager
def _building_on(device: torch.device | str) -> Iterator[None]:
    """Modules made inside are made on ``device`` (on ``meta`` without running ``normal_``)."""
    with torch.device(device):
        if torch.device(device).type != "meta":
            yield
            return
        with _SkipNormalInit():
            yield


def model_layout(config: OuroConfig, source: str | os.PathLike = CONFIG_NAME) -> ModelLayout:
    """The ``ModelLayout`` of ``config``'s model; ``source``: where the config came from, for messages."""
    try:
        with _building_on("meta"):
            model = model_class(config)(dataclasses.replace(config, num_hidden_layers=1))
    except RuntimeError as e:  # e.g. "Storage size calculation overflowed"
        raise ConfigError(f"{source}: the sizes are too large for any model: {e}") from e
    return _layout(model, config.num_hidden_layers)


def _layout(model: nn.Module, num_layers: int) -> ModelLayout:
    """``model`` (built with one decoder layer; ``num_layers`` 0: the whole model as ``outer``) as a layout."""
    prefix = ModelLayout.PREFIX + "0."

    def in_layer(name: str) -> bool:
        return num_layers > 0 and name.startswith(prefix)

    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    params, gates = {False: 0, True: 0}, {False: 0, True: 0}  # outside / in the one layer
    for name, p in model.named_parameters():
        params[in_layer(name)] += p.numel()
        if is_gate_parameter(name):
            gates[in_layer(name)] += p.numel()
    return ModelLayout(
        outer={n: s for n, s in shapes.items() if not in_layer(n)},
        layer={n.removeprefix(prefix): s for n, s in shapes.items() if in_layer(n)},
        num_layers=num_layers,
        num_parameters=params[False] + num_layers * params[True],
        gate_parameters=gates[False] + num_layers * gates[True],
    )


def build_model(
    config: OuroConfig, device: torch.device | str = "meta", dtype: torch.dtype = torch.float32
) -> nn.Module:
    """An un-loaded model for ``config``: on ``meta`` it allocates nothing (for sizing). Even there
    each layer costs Python objects, so a depth that cannot fit in memory is refused first."""
    layers = config.num_hidden_layers
    check_fits(layers * LAYER_OBJECT_BYTES, "cpu", f"building a model of {layers:,} layers")
    if str(device) != "meta":
        check_fits(model_layout(config).num_parameters * 4, device, "the model's float32 weights")
    with _building_on(device):
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


def _read_header(file: Path) -> dict[str, TensorInfo]:
    """The tensors of a safetensors file, from its header alone (8 bytes: the header's length,
    little-endian; then that much JSON): no tensor data is read or mapped, so sizing a huge
    checkpoint is instant. The header must fit in the file, and every tensor's bytes in its data."""
    if not file.is_file():
        raise CheckpointNotFoundError(f"weights file {file} not found")
    bad = f"{file} is not a valid safetensors file (truncated or corrupt)"
    with open(file, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        length = int.from_bytes(f.read(8), "little") if size >= 8 else None
        if length is None or length > size - 8:
            found = f"{size:,} bytes" if length is None else f"a {length:,}-byte header in {size:,} bytes"
            raise CorruptCheckpointError(f"{bad}: found {found}")
        if length > MAX_JSON_BYTES:
            raise CorruptCheckpointError(f"{bad}: its header is larger than {MAX_JSON_BYTES:,} bytes")
        header = _read_json(
            file, CorruptCheckpointError, "a valid safetensors file (truncated or corrupt)", f.read(length)
        )
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{bad}: its header is not a JSON object")
    data_bytes = size - 8 - length
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        entry = entry if isinstance(entry, dict) else {}
        code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not (
            isinstance(code, str)
            and isinstance(shape, list)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in [*shape, *offsets])
        ):
            raise CorruptCheckpointError(f"{bad}: the header entry of tensor {name} is malformed")
        if code not in SAFETENSORS_DTYPES:
            raise UnsupportedModelError(f"{file}: tensor {name} has dtype {code}; melt reads F32, BF16, F16")
        info = TensorInfo(file, SAFETENSORS_DTYPES[code], tuple(shape))
        begin, end = offsets
        if end > data_bytes or end - begin != info.nbytes:
            raise CorruptCheckpointError(
                f"{bad}: tensor {name} ({info.nbytes:,} bytes) is said to lie at bytes {begin:,}..{end:,} "
                f"of {data_bytes:,} bytes of data"
            )
        infos[name] = info
    return infos


def _shard_files(root: Path, index_file: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file name) of a sharded checkpoint's index. A shard
    is a file of the checkpoint directory: any other path (``../x``, ``/etc/x``, ``sub/x``) is refused."""
    index = _read_json(index_file, CorruptCheckpointError, "a valid safetensors index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CorruptCheckpointError(f"{index_file} is not a valid safetensors index: it has no weight_map object")
    for name, shard in weight_map.items():
        plain = isinstance(shard, str) and shard not in ("", ".", "..") and Path(shard).name == shard
        if not plain or "\x00" in shard or "\\" in shard:
            raise CorruptCheckpointError(
                f"{index_file}: tensor {name} is mapped to {shard!r}; "
                f"a shard must be a file name in the checkpoint directory {root}"
            )
    return weight_map


def read_weight_headers(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Name -> header info of every stored tensor (single file or sharded). Empty: no weights.
    Only the headers are read: the tensor data is neither read nor mapped."""
    root = checkpoint_dir(path)
    index_file = root / INDEX_NAME
    if index_file.is_file():
        weight_map = _shard_files(root, index_file)
        files = sorted({root / f for f in weight_map.values()})
    elif (root / WEIGHTS_NAME).is_file():
        weight_map, files = None, [root / WEIGHTS_NAME]
    else:
        return {}
    infos: dict[str, TensorInfo] = {}
    for file in files:
        infos.update(_read_header(file))
    if weight_map is not None:
        listed_elsewhere = {n for n, f in weight_map.items() if n not in infos or infos[n].file != root / f}
        if listed_elsewhere:
            raise CorruptCheckpointError(
                f"{index_file} lists tensors its shards do not hold where it says: {_names(listed_elsewhere)}"
            )
    return infos


def _names(names: set[str] | list[str], limit: int = 5, total: int | None = None) -> str:
    names = sorted(names)
    total = len(names) if total is None else total
    more = f" (+{total - limit} more)" if total > limit else ""
    return ", ".join(names[:limit]) + more


def check_weights(model: nn.Module | OuroConfig, infos: dict[str, TensorInfo], where: Path) -> None:
    """Strict check: the stored tensors are exactly the model's, with the model's shapes. ``model``:
    a built model, or a config (checked through its ``ModelLayout``, whatever its depth)."""
    layout = _layout(model, 0) if isinstance(model, nn.Module) else model_layout(model, where / CONFIG_NAME)
    expected = {name: layout.shape(name) for name in infos}
    unexpected = {name for name, shape in expected.items() if shape is None}
    missing_count = layout.num_tensors - (len(infos) - len(unexpected))
    if missing_count:
        missing = []
        for name in layout.names():  # stops at the first few: the rest are counted, not listed
            if name not in infos:
                missing.append(name)
                if len(missing) == 5:
                    break
        raise WeightsMismatchError(
            f"{where} is missing {missing_count} tensor(s) the config needs: {_names(missing, total=missing_count)}"
        )
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
    Weights that do not fit in the device's free memory are refused before any is read; tensors
    holding NaN or infinity are named in one ``MeltWarning``.
    """
    root = checkpoint_dir(path)
    config = load_config(root)
    infos = read_weight_headers(root)
    target = dtype_or_stored(dtype, stored_dtype(infos, config))
    if str(device) != "meta":
        if not infos:
            raise CheckpointNotFoundError(f"{root} has no weights ({WEIGHTS_NAME} or {INDEX_NAME})")
        check_weights(config, infos, root)  # before the model is built: its depth is then known to be real
        count = sum(math.prod(i.shape) for i in infos.values())
        check_fits(
            count * target.itemsize, device, f"the weights of {root} ({count:,} parameters in {dtype_name(target)})"
        )
    model = build_model(config, "meta", target)
    model.name_or_path = str(root)
    if str(device) == "meta":
        return model.eval()
    from accelerate.utils import set_module_tensor_to_device  # (accelerate is slow to import: only when weights load)

    total, done = sum(i.nbytes for i in infos.values()), 0
    non_finite: list[str] = []
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
                value = aligned(tensor.to(target))
                if not bool(torch.isfinite(value).all()):
                    non_finite.append(name)
                set_module_tensor_to_device(model, name, device, value=value)
                done += infos[name].nbytes
                if progress is not None:
                    progress(done, total)
    if non_finite:
        warnings.warn(
            MeltWarning(
                f"{root}: {len(non_finite)} tensor(s) hold NaN or infinite values in {dtype_name(target)}: "
                f"{_names(non_finite)}; the model's outputs may be NaN"
            ),
            stacklevel=2,
        )
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
    with atomic_directory(out, force=force, keep=keep) as tmp, writing(out):
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
