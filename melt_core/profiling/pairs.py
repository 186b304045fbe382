"""Ouro and its MELT counterpart side by side: configs, parameter counts, loaded models."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoints import build_model, checkpoint_dir, load_config, load_model, melt_from_ouro
from ..errors import CheckpointNotFoundError, InvalidArgumentError
from ..models import MeltConfig, MeltForCausalLM, MeltSettings, OuroConfig, OuroForCausalLM, is_melt


def config_pair(config: OuroConfig) -> tuple[OuroConfig, MeltConfig]:
    """(Ouro config, MELT config) from either: a MELT config's base, or an Ouro config's conversion
    with default ``MeltSettings`` (what ``melt convert`` writes)."""
    if is_melt(config):
        raw = {k: v for k, v in config.to_dict().items() if k != "melt"}
        return OuroConfig.from_dict({**raw, "model_type": "ouro"}), config
    return config, MeltConfig.from_ouro(config, MeltSettings())


def parameter_counts(config: OuroConfig) -> tuple[int, int]:
    """(all parameters, KV-gate parameters), counted on the meta device (nothing is allocated)."""
    model = build_model(config, "meta")
    total = sum(p.numel() for p in model.parameters())
    gates = sum(p.numel() for p in model.gate_parameters())
    return total, gates


@dataclass
class ModelPair:
    """An Ouro model and its MELT counterpart, and where each came from."""

    ouro: OuroForCausalLM
    melt: MeltForCausalLM
    ouro_source: str
    melt_source: str


def load_pair(
    checkpoint: str | Path, dtype: str | torch.dtype | None = None, device: torch.device | str = "cpu"
) -> ModelPair:
    """Given an Ouro checkpoint: it, and its MELT conversion built in memory (shared weights, gates
    initialised as ``melt convert`` does). Given a MELT checkpoint: it, and the Ouro checkpoint its
    config records as ``melt.source``."""
    root = checkpoint_dir(checkpoint)
    config = load_config(root)
    if is_melt(config):
        source = config.melt.source
        if not source:
            raise InvalidArgumentError(
                f"{root} is a MELT checkpoint that records no Ouro source (melt.source in config.json); "
                f"pass the Ouro checkpoint instead, or set melt.source"
            )
        if not Path(source).is_dir():
            raise CheckpointNotFoundError(
                f"{root} was converted from {source}, which does not exist here; pass the Ouro checkpoint instead"
            )
        melt = load_model(root, dtype=dtype, device=device)
        ouro = load_model(source, dtype=melt.dtype, device=device)
        return ModelPair(ouro, melt, str(source), str(root))
    ouro = load_model(root, dtype=dtype, device=device)
    return ModelPair(ouro, melt_from_ouro(ouro), str(root), f"in-memory conversion of {root} (untrained gates)")
