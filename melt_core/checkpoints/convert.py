"""Ouro checkpoint -> MELT checkpoint (``melt convert``).

The base tensors are copied unchanged (bit-identical unless a dtype change is asked for); the
gate tensors are new, initialised as ``MeltSettings`` says. The output is written to a temporary
directory, reloaded with melt's own loader as a check, and only then renamed into place.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import torch

from ..dtypes import dtype_name, dtype_or_stored
from ..errors import CheckpointNotFoundError, InvalidArgumentError, UnsupportedModelError
from ..models import MeltConfig, MeltForCausalLM, MeltSettings, OuroForCausalLM, config_from_dict, is_melt, is_ouro
from ..models.update_rules import GATE_MODULE, UPDATE_RULES
from ..outputs import atomic_directory, check_output, writing
from .io import (
    DEFAULT_MAX_SHARD_SIZE,
    _open_safetensors,
    build_model,
    check_weights,
    checkpoint_dir,
    copy_tokenizer_files,
    load_model,
    read_config_dict,
    read_weight_headers,
    stored_dtype,
    write_config,
    write_weights,
)

# (done_bytes, total_bytes, phase) with phase in {"read", "write", "verify"}
ConvertProgress = Callable[[int, int, str], None]


def gate_tensors(config: MeltConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The initial gate tensors of every layer (none for training-free policies)."""
    gate = UPDATE_RULES[config.melt.policy].make_gate(config.hidden_size)
    if gate is None:
        return {}
    gate.reset(config.melt.z0)
    tensors = {}
    for i in range(config.num_hidden_layers):
        for name, p in gate.named_parameters():
            tensors[f"model.layers.{i}.{GATE_MODULE}.{name}"] = p.detach().to(dtype).clone()
    return tensors


def convert_ouro_to_melt(
    source: str | os.PathLike,
    out: str | os.PathLike,
    settings: MeltSettings | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    force: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    progress: ConvertProgress | None = None,
) -> Path:
    """Write a MELT checkpoint converted from the Ouro checkpoint ``source`` to ``out``."""
    root = checkpoint_dir(source)
    raw = read_config_dict(root)
    if is_melt(raw):
        raise UnsupportedModelError(f"{root} is already a MELT checkpoint; melt convert takes an Ouro checkpoint")
    ouro = config_from_dict(raw, source=str(root / "config.json"))
    if Path(out).resolve() == root.resolve():
        raise InvalidArgumentError("the output directory must differ from the source checkpoint")
    check_output(out, force, keep=[root])
    infos = read_weight_headers(root)
    if not infos:
        raise CheckpointNotFoundError(f"{root} has no weights to convert")
    check_weights(build_model(ouro, "meta"), infos, root)
    target = dtype_or_stored(dtype, stored_dtype(infos, ouro))

    settings = dataclasses.replace(settings or MeltSettings(), source=str(root.resolve()))
    config = MeltConfig.from_ouro(ouro, settings)
    gates = gate_tensors(config, target)
    base_bytes = sum(i.nbytes for i in infos.values())
    out_bytes = sum(torch.Size(i.shape).numel() for i in infos.values()) * target.itemsize
    out_bytes += sum(t.nbytes for t in gates.values())
    total = base_bytes + 2 * out_bytes  # read, write, verify
    done = 0

    def report(nbytes: int, phase: str) -> None:
        nonlocal done
        done += nbytes
        if progress is not None:
            progress(done, total, phase)

    with atomic_directory(out, force=force, keep=[root]) as tmp:
        tensors: dict[str, torch.Tensor] = {}
        for file in sorted({i.file for i in infos.values()}):
            with _open_safetensors(file) as f:
                for name in sorted(n for n, i in infos.items() if i.file == file):
                    tensors[name] = f.get_tensor(name).to(target)
                    report(infos[name].nbytes, "read")
        tensors.update(gates)
        with writing(out):  # only the writes: an error reading the source is the source's
            write_weights(tensors, tmp, max_shard_size, progress=lambda n: report(n, "write"))
            del tensors
            config_dict = config.to_dict()
            config_dict["torch_dtype"] = dtype_name(target)
            write_config(config_dict, tmp)
            copy_tokenizer_files(root, tmp)
        # the check: melt's own loader must read back every tensor of the new model
        load_model(tmp, device="cpu")
        report(out_bytes, "verify")
    return Path(out)


def melt_from_ouro(ouro: OuroForCausalLM, settings: MeltSettings | None = None) -> MeltForCausalLM:
    """An in-memory MELT model converted from a loaded Ouro model, as ``melt convert`` would write
    it: the base tensors are SHARED with ``ouro`` (no copy: both models fit in the memory of one)
    and the gates are freshly initialised from ``settings``. Inference only (eval mode)."""
    if not is_ouro(ouro):
        raise UnsupportedModelError(f"melt_from_ouro takes an Ouro model, got model_type {ouro.config.model_type!r}")
    settings = dataclasses.replace(settings or MeltSettings())  # a copy: the caller's is not touched
    if settings.source is None:
        settings.source = getattr(ouro, "name_or_path", None)
    config = MeltConfig.from_ouro(ouro.config, settings)
    melt = build_model(config, "meta", ouro.dtype)
    state = dict(ouro.state_dict())
    state.update({name: t.to(ouro.device) for name, t in gate_tensors(config, ouro.dtype).items()})
    melt.load_state_dict(state, strict=True, assign=True)
    melt.name_or_path = settings.source
    return melt.eval()
