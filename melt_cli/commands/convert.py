"""``melt convert``: an Ouro checkpoint -> a MELT checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from melt_core.checkpoints import convert_ouro_to_melt
from melt_core.models.config import MELT_H0, MELT_LAYOUTS, MELT_POLICIES, MeltSettings

from .. import console
from ..options import Dtype
from ..progress import byte_progress

EPILOG = """Examples:

  melt convert ./Ouro-1.4B ./MELT-1.6B

  melt convert ./Ouro-1.4B ./melt-last --policy last           (training-free baseline)

  melt convert ./Ouro-1.4B ./melt-fts --policy last --layout first_then_shared

  melt convert ./Ouro-1.4B ./melt-fp32 --dtype fp32 --z0 0.05 --chunk-size 256 --force
"""


M = MeltSettings


def convert(
    source: Annotated[Path, typer.Argument(help="Ouro checkpoint directory.")],
    out: Annotated[Path, typer.Argument(help="Output MELT checkpoint directory.")],
    policy: Annotated[str, typer.Option(help=f"KV-update policy: {', '.join(MELT_POLICIES)}.")] = M.policy,
    layout: Annotated[
        str, typer.Option(help=f"Cache layout: {', '.join(MELT_LAYOUTS)} (loop 1's rows kept apart: 2x the memory).")
    ] = M.layout,
    h0: Annotated[str, typer.Option(help=f"Latent state before loop 1 (learned gates): {', '.join(MELT_H0)}.")] = (
        M.h0
    ),
    z0: Annotated[float, typer.Option(help="Initial gate value: b_z = logit(z0), W_z = U_z = 0.")] = M.z0,
    chunk_size: Annotated[int, typer.Option(help="Chunk size for training and prefill.")] = M.chunk_size,
    dtype: Dtype = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty OUT.")] = False,
) -> None:
    """Convert an Ouro checkpoint into a MELT checkpoint (base weights unchanged + new KV gates)."""
    settings = MeltSettings(policy=policy, layout=layout, h0=h0, z0=z0, chunk_size=chunk_size)
    with byte_progress("converting") as update:
        path = convert_ouro_to_melt(source, out, settings, dtype=dtype, force=force, progress=update)
    console.err.print(
        f"wrote MELT checkpoint to {path} (policy {policy}, layout {layout}); check it with: melt info {path}"
    )


def register(app: typer.Typer) -> None:
    app.command(epilog=EPILOG)(convert)
