"""What a checkpoint argument names: a local directory, a checkpoint installed with the package
(``melt generate example``), or a Hugging Face Hub model id (``melt convert ByteDance/Ouro-1.4B OUT``)."""

from __future__ import annotations

import os
from pathlib import Path

ASSETS = Path(__file__).parent.parent / "assets"
BUILTIN_CHECKPOINTS = {"example": ASSETS / "example", "reasoning": ASSETS / "reasoning"}


def resolve(path: str | os.PathLike) -> Path:
    """The first that applies: ``path`` itself when it exists; the built-in checkpoint of that name;
    the Hub model ``owner/name[@revision]`` (from the Hub cache, downloaded if missing); else ``path``,
    which the caller reports as missing."""
    p = Path(path)
    if p.exists():
        return p
    if str(path) in BUILTIN_CHECKPOINTS:
        return BUILTIN_CHECKPOINTS[str(path)]
    from . import hub  # (huggingface_hub's download machinery is slow to import: only for names of no local path)

    if hub.is_hub_id(path):
        return hub.resolve_hub_id(str(path))
    return p
