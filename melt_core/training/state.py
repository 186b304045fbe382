"""Training checkpoints that hold only tensors and JSON: nothing in a run directory is ever unpickled.

A run directory may come from a colleague or a download, so resuming must not run code from it
(accelerate's ``save_state`` pickles registered objects and RNG states and loads them with
``weights_only=False``). A checkpoint ``checkpoints/step-N/`` holds:

- ``model.safetensors`` (or shards + index): the trained module's state dict;
- ``optimizer.safetensors`` + ``optimizer.json``: the optimizer's per-parameter tensors, and its
  parameter groups and scalars;
- ``rng-R.safetensors``: process R's torch (and CUDA) generator states; Python's and NumPy's in its
  metadata as JSON;
- ``run_state.json``, written last: the step, the run's settings, the scheduler's state, the data
  fingerprint. A directory without it is not a checkpoint.

``load_newest_intact`` reads the newest checkpoint that loads completely and has finite weights,
and says which newer ones it skipped and why (a crash or a full disk can leave one torn).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..checkpoints.files import INDEX_NAME, WEIGHTS_NAME
from ..checkpoints.io import write_weights

CHECKPOINTS = "checkpoints"
RUN_STATE = "run_state.json"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"


class UnreadableCheckpoint(Exception):
    """A checkpoint that cannot be used; the message says which file and why."""


@dataclass
class TrainingState:
    """Everything a checkpoint holds, read into CPU memory."""

    path: Path
    run_state: dict[str, Any]
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, Any] | None  # this process's generators (None: saved by a launch with fewer processes)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def step(self) -> int:
        return int(self.run_state["step"])


# --- writing -------------------------------------------------------------------------------------
def save_model_state(state_dict: dict[str, torch.Tensor], ckpt: Path) -> None:
    write_weights(state_dict, ckpt)


def save_optimizer_state(state: dict[str, Any], ckpt: Path) -> None:
    """``optimizer.state_dict()``: tensors to safetensors, everything else to JSON."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}/{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    save_file(tensors, str(ckpt / OPTIMIZER_TENSORS))
    meta = {"param_groups": state["param_groups"], "scalars": scalars}
    (ckpt / OPTIMIZER_JSON).write_text(json.dumps(meta) + "\n")


def rng_file(ckpt: Path, rank: int) -> Path:
    return ckpt / f"rng-{rank}.safetensors"


def save_rng_state(ckpt: Path, rank: int) -> None:
    """This process's random generators (torch, CUDA, Python, NumPy)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors |= {f"cuda/{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(keys.astype(np.int64))
    metadata = {
        "python": json.dumps(random.getstate()),
        "numpy": json.dumps([kind, int(pos), int(has_gauss), float(cached)]),
    }
    save_file(tensors, str(rng_file(ckpt, rank)), metadata=metadata)


def write_run_state(ckpt: Path, run_state: dict[str, Any]) -> None:
    (ckpt / RUN_STATE).write_text(json.dumps(run_state) + "\n")


# --- reading -------------------------------------------------------------------------------------
def read_json(file: Path, what: str = "") -> Any:
    """A JSON file of a run; a missing, unreadable or corrupt one raises ``UnreadableCheckpoint``."""
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise UnreadableCheckpoint(f"{file} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise UnreadableCheckpoint(f"{file} is corrupt ({what or 'not valid JSON'}: {e})") from None
    except OSError as e:
        raise UnreadableCheckpoint(f"{file} cannot be read: {e.strerror or e}") from None


def _tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise UnreadableCheckpoint(f"{file} is missing")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UnreadableCheckpoint(f"{file} is truncated or corrupt ({e})") from None


def read_run_state(ckpt: Path) -> dict[str, Any]:
    state = read_json(ckpt / RUN_STATE)
    if not isinstance(state, dict) or not isinstance(state.get("args"), dict):
        raise UnreadableCheckpoint(f"{ckpt / RUN_STATE} is corrupt (no step and args)")
    step = state.get("step")
    named = ckpt.name.removeprefix("step-")
    if type(step) is not int or step < 1 or (named.isdigit() and int(named) != step):
        raise UnreadableCheckpoint(f"{ckpt / RUN_STATE} is corrupt (step {step!r} in {ckpt.name})")
    return state


def read_model_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """The saved weights, all finite (a checkpoint with NaN/inf weights is not one to resume from)."""
    if (ckpt / INDEX_NAME).is_file():
        index = read_json(ckpt / INDEX_NAME)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise UnreadableCheckpoint(f"{ckpt / INDEX_NAME} is corrupt (no weight_map)")
        names = sorted(set(weight_map.values()))
        if any(Path(n).name != n for n in names):  # shards live in the checkpoint itself
            raise UnreadableCheckpoint(f"{ckpt / INDEX_NAME} names shards outside {ckpt}")
        files = [ckpt / n for n in names]
    else:
        files = [ckpt / WEIGHTS_NAME]
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights |= _tensors(file)
    bad = [name for name, t in weights.items() if t.is_floating_point() and not bool(t.isfinite().all())]
    if bad:
        raise UnreadableCheckpoint(f"{ckpt} holds non-finite weights ({', '.join(sorted(bad)[:3])})")
    return weights


def read_optimizer_state(ckpt: Path) -> dict[str, Any]:
    tensors = _tensors(ckpt / OPTIMIZER_TENSORS)
    meta = read_json(ckpt / OPTIMIZER_JSON)
    if not isinstance(meta, dict) or not isinstance(meta.get("param_groups"), list):
        raise UnreadableCheckpoint(f"{ckpt / OPTIMIZER_JSON} is corrupt (no param_groups)")
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        index, _, key = name.partition("/")
        state.setdefault(int(index), {})[key] = tensor
    for index, values in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def read_rng_state(ckpt: Path, rank: int) -> dict[str, Any] | None:
    file = rng_file(ckpt, rank)
    if not file.is_file():
        return None
    tensors = _tensors(file)
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
        python = json.loads(metadata["python"])
        kind, pos, has_gauss, cached = json.loads(metadata["numpy"])
    except (KeyError, ValueError, TypeError, SafetensorError) as e:
        raise UnreadableCheckpoint(f"{file} is corrupt ({e})") from None
    return {"tensors": tensors, "python": python, "numpy": (kind, pos, has_gauss, cached)}


def restore_rng_state(rng: dict[str, Any]) -> None:
    tensors = rng["tensors"]
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda/")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))


def read_checkpoint(ckpt: Path, rank: int = 0) -> TrainingState:
    """Every file of one checkpoint, verified; ``UnreadableCheckpoint`` names the first bad one."""
    run_state, model = read_run_state(ckpt), read_model_state(ckpt)
    return TrainingState(ckpt, run_state, model, read_optimizer_state(ckpt), read_rng_state(ckpt, rank))


def checkpoints_of(run: Path) -> list[Path]:
    """A run's checkpoint directories, oldest first (only those with a run_state.json)."""
    folder = run / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(c for c in folder.glob("step-*") if (c / RUN_STATE).is_file())


def load_newest_intact(candidates: list[Path], rank: int = 0) -> TrainingState:
    """The newest of ``candidates`` (oldest first) that reads completely; the newer ones it had to
    skip are in ``skipped``. None reads: ``UnreadableCheckpoint`` with every reason."""
    skipped: list[tuple[Path, str]] = []
    for ckpt in reversed(candidates):
        try:
            state = read_checkpoint(ckpt, rank)
        except UnreadableCheckpoint as e:
            skipped.append((ckpt, str(e)))
            continue
        state.skipped = skipped
        return state
    raise UnreadableCheckpoint("; ".join(reason for _, reason in skipped) or "no checkpoint")
