"""What ``melt info`` reports about a checkpoint: sizes, counted exactly from config and headers."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from ..dtypes import dtype_bytes, dtype_name
from ..models import is_melt
from .files import CONFIG_NAME
from .io import check_weights, checkpoint_dir, load_config, model_layout, read_weight_headers, stored_dtype


@dataclass
class ModelSummary:
    path: str
    model_type: str
    loops: int
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    num_parameters: int
    gate_parameters: int
    dtype: str
    has_weights: bool
    weights_bytes: int
    kv_bytes_per_token: int
    melt: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize_checkpoint(path: str | os.PathLike) -> ModelSummary:
    """Summary of a checkpoint directory; works with config.json alone. Nothing but headers is read
    and no model is built (counts come from one layer on the meta device), so it is instant and
    small however large the checkpoint or deep its config.

    ``weights_bytes`` is the stored tensor bytes when weights exist, else parameters x dtype size.
    ``kv_bytes_per_token`` is the whole KV cache per token at the configured loop count, in ``dtype``
    (Ouro: one row per loop and layer; MELT: one row per layer, whatever the loop count).
    """
    root = checkpoint_dir(path)
    config = load_config(root)
    infos = read_weight_headers(root)
    dtype = stored_dtype(infos, config)
    layout = model_layout(config, root / CONFIG_NAME)
    if infos:
        check_weights(config, infos, root)
    num_parameters = layout.num_parameters
    weights_bytes = sum(i.nbytes for i in infos.values()) if infos else num_parameters * dtype_bytes(dtype)
    return ModelSummary(
        path=str(root),
        model_type=config.model_type,
        loops=config.total_ut_steps,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        vocab_size=config.vocab_size,
        num_parameters=num_parameters,
        gate_parameters=layout.gate_parameters,
        dtype=dtype_name(dtype),
        has_weights=bool(infos),
        weights_bytes=weights_bytes,
        kv_bytes_per_token=config.kv_bytes_per_token(dtype),
        melt=asdict(config.melt) if is_melt(config) else None,
    )
