"""Checkpoints installed with the package, loadable by a short name (``melt generate example``)."""

from __future__ import annotations

import os
from pathlib import Path

ASSETS = Path(__file__).parent.parent / "assets"
BUILTIN_CHECKPOINTS = {"example": ASSETS / "example"}


def resolve(path: str | os.PathLike) -> Path:
    """``path`` itself when it exists, else the built-in checkpoint of that name, else ``path``."""
    p = Path(path)
    if not p.exists() and str(path) in BUILTIN_CHECKPOINTS:
        return BUILTIN_CHECKPOINTS[str(path)]
    return p
