"""Rich consoles: data goes to stdout, messages and progress to stderr. In a distributed launch only
the main process prints (one header, one progress bar, one result); the others print only their
errors (``rank_err``)."""

from __future__ import annotations

import os

from rich.console import Console

RANK = int(os.environ.get("RANK", "0") or 0)
out = Console(highlight=False, quiet=RANK != 0)
err = Console(stderr=True, highlight=False, quiet=RANK != 0)
rank_err = err if RANK == 0 else Console(stderr=True, highlight=False)


def human_bytes(n: float) -> str:
    """1536 -> '1.50 KiB' (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
