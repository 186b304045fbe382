"""``melt info``: model type, sizes, parameter count and KV-cache bytes of a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from melt_core.checkpoints.summary import summarize_checkpoint
from melt_core.words import plural

from .. import console

EPILOG = """Examples:

  melt info ./Ouro-1.4B

  melt info ./Ouro-1.4B --json | jq .kv_bytes_per_token
"""


LAYOUT_ROWS = {
    "shared": "one shared row per layer, any loop count",
    "first_then_shared": "per layer: loop 1's row and one shared by later loops",
}


def info(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory (config.json is enough).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Show a checkpoint's architecture, exact parameter count and memory per token."""
    summary = summarize_checkpoint(checkpoint)
    if as_json:
        console.out.print_json(json.dumps(summary.to_dict()))
        return
    table = Table(title=f"{summary.path}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    rows = [
        ("model type", summary.model_type),
        ("loops", str(summary.loops)),
        ("layers", str(summary.num_layers)),
        ("hidden size", str(summary.hidden_size)),
        ("intermediate size", str(summary.intermediate_size)),
        ("attention heads / kv heads", f"{summary.num_attention_heads} / {summary.num_key_value_heads}"),
        ("head dim", str(summary.head_dim)),
        ("vocab size", str(summary.vocab_size)),
        ("parameters", f"{summary.num_parameters:,}"),
        ("dtype", summary.dtype),
        (
            "weights",
            f"{summary.weights_bytes:,} B ({console.human_bytes(summary.weights_bytes)})"
            + ("" if summary.has_weights else "  [dim](config only)[/]"),
        ),
    ]
    if summary.melt is None:
        rows.append(("KV cache per token", f"{summary.kv_bytes_per_token:,} B ({plural(summary.loops, 'loop')})"))
    else:
        rows += [
            ("KV cache per token", f"{summary.kv_bytes_per_token:,} B ({LAYOUT_ROWS[summary.melt['layout']]})"),
            ("gate parameters", f"{summary.gate_parameters:,}"),
            ("MELT policy / h0 / z0", f"{summary.melt['policy']} / {summary.melt['h0']} / {summary.melt['z0']}"),
            ("MELT cache layout", summary.melt["layout"]),
            ("chunk size", str(summary.melt["chunk_size"])),
            ("converted from", str(summary.melt["source"])),
        ]
    for key, value in rows:
        table.add_row(key, value)
    console.out.print(table)


def register(app: typer.Typer) -> None:
    app.command(epilog=EPILOG)(info)
