"""``melt eval text|problems|tasks``: held-out loss and perplexity per loop (and agreement with a
teacher), greedy-answer accuracy per loop on a problem file, or lm-evaluation-harness tasks per loop;
each subcommand calls one core function."""

import json
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.table import Table
from typer.core import TyperGroup

from melt_core.cache.quantized import kv_format
from melt_core.data import is_problem_file
from melt_core.errors import InvalidArgumentError
from melt_core.evaluation import EvalReport, EvalSettings, evaluate_checkpoint, evaluate_problems
from melt_core.evaluation.problems import DEFAULT_BATCH as PROBLEM_BATCH
from melt_core.words import plural

from .. import console
from .. import options as o
from ..progress import byte_progress

EPILOG = """Examples:

  melt eval text runs/phase2 --data valid.jsonl.gz --teacher ./Ouro-1.4B

  melt eval text ./Ouro-1.4B --data valid.jsonl.gz --loops 1,2,4,8 --json

  melt data reasoning --split test --hops 1-5 --n 500 --seed 1 --out test.jsonl
  melt eval problems reasoning --data test.jsonl --loops 1,2,4,8      (accuracy per loop and hop count)
  melt eval problems reasoning --data test.jsonl --kv-dtype int4     (through an int4 KV cache)

  melt eval tasks ./MELT-1.6B --tasks arc_easy,hellaswag --loops 1,4,8 --limit 200      (needs melt[eval])

  melt eval tasks example --tasks my_task --include-path ./my_tasks --json

The one-command spelling (melt eval CKPT --data F / --tasks T) still works.
"""


E = EvalSettings

Checkpoint = Annotated[Path, typer.Argument(help="Ouro or MELT checkpoint directory (or a built-in name).")]
Loops = Annotated[str | None, typer.Option(help="Loop counts to run, e.g. 1,2,4,8 (default: the model's).")]
As_json = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]


def text(
    checkpoint: Checkpoint,
    data: Annotated[
        Path,
        typer.Option(
            "--data",
            help="Held-out text: .txt, .jsonl(.gz), a folder, or a saved dataset (a DatasetDict: its train split).",
        ),
    ],
    teacher: Annotated[
        Path | None, typer.Option(help="Ouro teacher: adds KL(teacher || model) and top-1 agreement per loop.")
    ] = None,
    loops: Loops = None,
    seq_len: Annotated[int, typer.Option(help="Tokens per evaluated sequence.")] = E.seq_len,
    max_sequences: Annotated[int, typer.Option(help="Evaluate the first N packed sequences (0: all).")] = (
        E.max_sequences
    ),
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = E.batch_size,
    text_field: o.TextField = E.text_field,
    device: o.Device = E.device,
    dtype: o.Dtype = E.dtype,
    as_json: As_json = False,
) -> None:
    """Held-out loss and perplexity at every loop; with --teacher, agreement with the Ouro teacher."""
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
            loops=o.loop_list(loops),
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


def problems(
    checkpoint: Checkpoint,
    data: Annotated[
        Path,
        typer.Option(
            "--data", help="A problem file: .jsonl records with 'prompt' and 'answer' (e.g. from melt data reasoning)."
        ),
    ],
    loops: Loops = None,
    limit: Annotated[int | None, typer.Option(help="Score the first N problems.")] = None,
    batch_size: Annotated[int, typer.Option(help="Problems per batch.")] = PROBLEM_BATCH,
    chunk_size: Annotated[int | None, typer.Option(help="MELT's prefill chunk size (default: the model's).")] = None,
    device: o.Device = E.device,
    dtype: o.Dtype = E.dtype,
    kv_dtype: o.KvDtype = "auto",
    kv_group_size: o.KvGroupSize = None,
    kv_residual: o.KvResidual = 0,
    as_json: As_json = False,
) -> None:
    """Greedy-answer accuracy and answer loss per loop (and per hop count), decoded as melt generate decodes."""
    kv = kv_format(kv_dtype, kv_group_size, kv_residual)
    with byte_progress("evaluating", unit="problems") as update:
        report = evaluate_problems(
            checkpoint,
            data,
            loops=o.loop_list(loops),
            limit=limit,
            batch_size=batch_size,
            chunk_size=chunk_size,
            device=device,
            dtype=dtype,
            kv_dtype=kv,
            progress=update,
        )
    _print_problems(report, as_json)


def tasks(
    checkpoint: Checkpoint,
    tasks: Annotated[str, typer.Option("--tasks", help="lm-evaluation-harness tasks, comma-separated.")],
    include_path: Annotated[Path | None, typer.Option(help="A folder of local task YAML files.")] = None,
    limit: Annotated[int | None, typer.Option(help="The first N documents of each task.")] = None,
    loops: Loops = None,
    batch_size: Annotated[int, typer.Option(help="Requests per forward pass.")] = E.batch_size,
    device: o.Device = E.device,
    dtype: o.Dtype = E.dtype,
    as_json: As_json = False,
) -> None:
    """lm-evaluation-harness tasks per loop count (needs: pip install 'melt\\[eval]')."""
    try:
        from melt_core.integrations.lm_eval_model import evaluate_tasks
    except ImportError:
        raise InvalidArgumentError("melt eval tasks needs lm-evaluation-harness: pip install 'melt[eval]'") from None
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    with console.err.status("evaluating") as status:
        report = evaluate_tasks(
            checkpoint,
            names,
            loops=o.loop_list(loops),
            limit=limit,
            include_path=include_path,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            progress=lambda msg: status.update(f"evaluating {msg}"),
        )
    _print_tasks(report, as_json)


def _print_problems(report: EvalReport, as_json: bool) -> None:
    if as_json:
        console.out.print_json(json.dumps(report.to_dict()))
        return
    from ..tables import problem_tables

    for table in problem_tables(report, console.out.width):
        console.out.print(table)


def _print_tasks(report: Any, as_json: bool) -> None:
    if as_json:
        console.out.print_json(json.dumps(report.to_dict()))
        return
    table = Table(title=f"{report.checkpoint} ({report.model_type}): lm-eval tasks", title_justify="left")
    for col in ("loops", "task", "documents", "metric", "value", "stderr"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for count, per_task in report.results.items():
        for task, metrics in per_task.items():
            for metric, value in metrics.items():
                if metric.endswith("_stderr"):
                    continue
                stderr = metrics.get(f"{metric}_stderr")
                table.add_row(
                    str(count),
                    task,
                    str(report.documents.get(task, "")),
                    metric,
                    f"{value:.4f}",
                    "-" if stderr is None else f"{stderr:.4f}",
                )
        table.add_section()
    console.out.print(table)


class EvalGroup(TyperGroup):
    """``melt eval text|problems|tasks``; the older one-command spelling ``melt eval CKPT --data F`` /
    ``--tasks T`` still works: the subcommand is chosen as that command chose (with a note)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            sub = _legacy_subcommand(args)
            console.err.print(f"[dim]note: this is `melt eval {sub} {args[0]} ...` (melt eval text|problems|tasks)[/]")
            args = [sub, *args]
        return super().parse_args(ctx, args)


def _legacy_subcommand(args: list[str]) -> str:
    """The subcommand the one-command spelling meant: --tasks, or --data naming a problem file or text."""
    values: dict[str, str] = {}
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if name in ("--data", "--tasks"):
            values[name] = value if eq else (args[i + 1] if i + 1 < len(args) else "")
    if len(values) != 1:
        raise InvalidArgumentError("pass --data FILE (held-out loss) or --tasks T1,T2 (lm-eval), exactly one")
    if "--tasks" in values:
        return "tasks"
    return "problems" if is_problem_file(values["--data"]) else "text"


eval_app = typer.Typer(
    cls=EvalGroup,
    name="eval",
    help="Evaluate a checkpoint per loop: held-out text, a problem file, or lm-eval tasks.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    for command in (text, problems, tasks):
        eval_app.command(epilog=EPILOG)(command)
    app.add_typer(eval_app)
