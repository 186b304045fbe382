"""``melt random-model``: write a small random Ouro checkpoint in the exact HF format."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from melt_core.checkpoints.random_model import TINY_SHAPE, write_random_ouro

from .. import console
from ..options import int_parser

EPILOG = """Examples:

  melt random-model ./tiny-ouro

  melt random-model ./ouro-gqa --layers 4 --hidden 128 --heads 8 --kv-heads 2 --loops 4
"""


def random_model(
    out: Annotated[Path, typer.Argument(help="Output directory.")],
    layers: Annotated[int, typer.Option(help="Number of layers.")] = TINY_SHAPE["num_hidden_layers"],
    hidden: Annotated[int, typer.Option(help="Hidden size.")] = TINY_SHAPE["hidden_size"],
    intermediate: Annotated[int, typer.Option(help="MLP intermediate size.")] = TINY_SHAPE["intermediate_size"],
    heads: Annotated[int, typer.Option(help="Attention heads.")] = TINY_SHAPE["num_attention_heads"],
    kv_heads: Annotated[int, typer.Option(help="Key/value heads (GQA when fewer than heads).")] = (
        TINY_SHAPE["num_key_value_heads"]
    ),
    loops: Annotated[int, typer.Option(help="Loops (total_ut_steps).")] = TINY_SHAPE["total_ut_steps"],
    vocab_size: Annotated[int, typer.Option(help="BPE vocabulary size (trained on melt's sample text).")] = 512,
    dtype: Annotated[str, typer.Option(help="fp32, bf16 or fp16.")] = "fp32",
    seed: Annotated[int, typer.Option(parser=int_parser("--seed"), metavar="INTEGER", help="Random seed.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty OUT.")] = False,
) -> None:
    """Write a small random Ouro checkpoint (weights, config, tokenizer) for trying melt out."""
    path = write_random_ouro(
        out,
        seed=seed,
        dtype=dtype,
        vocab_size=vocab_size,
        force=force,
        num_hidden_layers=layers,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        total_ut_steps=loops,
    )
    console.err.print(f"wrote random Ouro checkpoint to {path}")


def register(app: typer.Typer) -> None:
    app.command(epilog=EPILOG)(random_model)
