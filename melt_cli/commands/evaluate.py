"""``melt eval``: held-out loss and perplexity per loop, and agreement with a teacher."""

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from melt_core.evaluation import EvalSettings, evaluate_checkpoint
from melt_core.models.config import validate_loops
from melt_core.words import plural

from .. import console
from .. import options as o
from ..progress import byte_progress

EPILOG = """Examples:

  melt eval runs/phase2 --data valid.jsonl.gz --teacher ./Ouro-1.4B

  melt eval ./Ouro-1.4B --data valid.jsonl.gz --loops 1,2,4,8 --json
"""


def parse_loops(text: str | None) -> list[int | None]:
    """'1,2,4' -> [1, 2, 4]; None -> [None] (the model's own loop count)."""
    if not text:
        return [None]
    return [validate_loops(n, "--loops values") for n in o.int_list(text, "--loops")]


E = EvalSettings


def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="Ouro or MELT checkpoint directory (or 'example').")],
    data: Annotated[
        Path, typer.Option("--data", help="Held-out text: .txt, .jsonl(.gz), a folder, or a saved dataset.")
    ],
    teacher: Annotated[
        Path | None, typer.Option(help="Ouro teacher: adds KL(teacher || model) and top-1 agreement per loop.")
    ] = None,
    loops: Annotated[str | None, typer.Option(help="Loop counts to run, e.g. 1,2,4,8 (default: the model's).")] = None,
    seq_len: Annotated[int, typer.Option(help="Tokens per evaluated sequence.")] = E.seq_len,
    max_sequences: Annotated[int, typer.Option(help="Evaluate the first N packed sequences (0: all).")] = (
        E.max_sequences
    ),
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = E.batch_size,
    text_field: o.TextField = E.text_field,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ...")] = E.device,
    dtype: Annotated[str, typer.Option(help="fp32, bf16 or fp16.")] = E.dtype,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Evaluate a checkpoint on held-out text: loss and perplexity at every loop."""
    with byte_progress("evaluating", unit="sequences") as update:
        report = evaluate_checkpoint(
            checkpoint,
            data,
            EvalSettings(
                seq_len=seq_len,
                max_sequences=max_sequences or None,
                batch_size=batch_size,
                text_field=text_field,
                device=device,
                dtype=dtype,
            ),
            teacher=teacher,
            loops=parse_loops(loops),
            progress=update,
        )
    if as_json:
        console.out.print_json(json.dumps(report.to_dict()))
        return
    for count, results in report.results.items():
        table = Table(
            title=f"{report.checkpoint} ({report.model_type}) on {report.data}: {report.tokens:,} tokens, "
            f"{plural(count, 'loop')}",
            title_justify="left",
        )
        for col in ("loop", "loss", "perplexity") + (("KL(teacher‖model)", "top-1 agreement") if teacher else ()):
            table.add_column(col, justify="right")
        for r in results:
            row = [str(r.loop), f"{r.loss:.4f}", f"{r.perplexity:.2f}"]
            if teacher:
                row += [f"{r.kl_to_teacher:.4f}", f"{r.top1_agreement:.2%}"]
            table.add_row(*row)
        console.out.print(table)


def register(app: typer.Typer) -> None:
    app.command("eval", epilog=EPILOG)(evaluate)
