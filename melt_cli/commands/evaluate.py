"""``melt eval``: held-out loss and perplexity per loop and agreement with a teacher, accuracy per
loop on a problem file (``--data F.jsonl`` with ``prompt``/``answer`` records), or
lm-evaluation-harness tasks per loop (``--tasks``)."""

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from melt_core.data import is_problem_file
from melt_core.errors import InvalidArgumentError
from melt_core.evaluation import EvalReport, EvalSettings, evaluate_checkpoint, evaluate_problems
from melt_core.evaluation.problems import DEFAULT_BATCH as PROBLEM_BATCH
from melt_core.models.config import validate_loops
from melt_core.words import plural

from .. import console
from .. import options as o
from ..progress import byte_progress

EPILOG = """Examples:

  melt eval runs/phase2 --data valid.jsonl.gz --teacher ./Ouro-1.4B

  melt eval ./Ouro-1.4B --data valid.jsonl.gz --loops 1,2,4,8 --json

  melt data reasoning --hops 1-8 --n 800 --seed 1 --out test.jsonl
  melt eval reasoning --data test.jsonl --loops 1,2,4,8      (accuracy per loop and hop count)

  melt eval ./MELT-1.6B --tasks arc_easy,hellaswag --loops 1,4,8 --limit 200      (needs melt[eval])

  melt eval example --tasks my_task --include-path ./my_tasks --json
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
        Path | None,
        typer.Option(
            "--data",
            help="Held-out text (.txt, .jsonl(.gz), a folder, a saved dataset), or a problem file: .jsonl records "
            "with 'prompt' and 'answer' (e.g. from `melt data reasoning`), scored by greedy-answer accuracy.",
        ),
    ] = None,
    tasks: Annotated[
        str | None,
        typer.Option(help="lm-evaluation-harness tasks instead of --data, comma-separated (needs melt[eval])."),
    ] = None,
    include_path: Annotated[Path | None, typer.Option(help="With --tasks: a folder of local task YAML files.")] = None,
    limit: Annotated[
        int | None, typer.Option(help="With --tasks: the first N documents of each task; with problems: the first N.")
    ] = None,
    teacher: Annotated[
        Path | None, typer.Option(help="Ouro teacher: adds KL(teacher || model) and top-1 agreement per loop.")
    ] = None,
    loops: Annotated[str | None, typer.Option(help="Loop counts to run, e.g. 1,2,4,8 (default: the model's).")] = None,
    seq_len: Annotated[int, typer.Option(help="Held-out text: tokens per evaluated sequence.")] = E.seq_len,
    max_sequences: Annotated[
        int, typer.Option(help="Held-out text: evaluate the first N packed sequences (0: all).")
    ] = E.max_sequences,
    batch_size: Annotated[
        int | None,
        typer.Option(help=f"Sequences per forward pass [default: {E.batch_size}; problems: {PROBLEM_BATCH}]."),
    ] = None,
    chunk_size: Annotated[
        int | None, typer.Option(help="Problems: MELT's prefill chunk size [default: the model's].")
    ] = None,
    text_field: o.TextField = E.text_field,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ...")] = E.device,
    dtype: Annotated[str, typer.Option(help="fp32, bf16 or fp16.")] = E.dtype,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Evaluate a checkpoint: loss and perplexity at every loop on held-out text, or lm-eval tasks."""
    if (data is None) == (tasks is None):
        raise InvalidArgumentError("pass --data FILE (held-out loss) or --tasks T1,T2 (lm-eval), exactly one")
    if tasks is not None:
        if teacher is not None:
            raise InvalidArgumentError(
                "--teacher compares per-loop predictions on --data; it does not apply to --tasks"
            )
        batch = E.batch_size if batch_size is None else batch_size
        _evaluate_tasks(checkpoint, tasks, include_path, limit, loops, batch, device, dtype, as_json)
        return
    if include_path is not None:
        raise InvalidArgumentError("--include-path applies to --tasks")
    if is_problem_file(data):
        if teacher is not None:
            raise InvalidArgumentError(
                "--teacher compares per-loop predictions on text; a problem file is scored by accuracy"
            )
        with byte_progress("evaluating", unit="problems") as update:
            report = evaluate_problems(
                checkpoint,
                data,
                loops=parse_loops(loops),
                limit=limit,
                batch_size=batch_size,
                chunk_size=chunk_size,
                device=device,
                dtype=dtype,
                progress=update,
            )
        _print_problems(report, as_json)
        return
    if limit is not None or chunk_size is not None:
        raise InvalidArgumentError("--limit applies to --tasks and problem files, --chunk-size to problem files")
    with byte_progress("evaluating", unit="sequences") as update:
        report = evaluate_checkpoint(
            checkpoint,
            data,
            EvalSettings(
                seq_len=seq_len,
                max_sequences=max_sequences or None,
                batch_size=E.batch_size if batch_size is None else batch_size,
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


def _print_problems(report: EvalReport, as_json: bool) -> None:
    if as_json:
        console.out.print_json(json.dumps(report.to_dict()))
        return
    for count, results in report.results.items():
        table = Table(
            title=f"{report.checkpoint} ({report.model_type}) on {report.data}: {plural(report.sequences, 'problem')}, "
            f"{plural(count, 'loop')}",
            title_justify="left",
        )
        hops = list(results[0].accuracy_by_hops or {})
        for col in ("loop", "accuracy", "answer loss", *(f"{k} hops" for k in hops)):
            table.add_column(col, justify="right")
        for r in results:
            by_hops = r.accuracy_by_hops or {}
            table.add_row(str(r.loop), f"{r.accuracy:.1%}", f"{r.loss:.4f}", *(f"{by_hops[k]:.0%}" for k in hops))
        console.out.print(table)


def _evaluate_tasks(
    checkpoint: Path,
    tasks: str,
    include_path: Path | None,
    limit: int | None,
    loops: str | None,
    batch_size: int,
    device: str,
    dtype: str,
    as_json: bool,
) -> None:
    try:
        from melt_core.integrations.lm_eval_model import evaluate_tasks
    except ImportError:
        raise InvalidArgumentError("--tasks needs lm-evaluation-harness: pip install 'melt[eval]'") from None
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    with console.err.status("evaluating") as status:
        report = evaluate_tasks(
            checkpoint,
            names,
            loops=parse_loops(loops),
            limit=limit,
            include_path=include_path,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            progress=lambda msg: status.update(f"evaluating {msg}"),
        )
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


def register(app: typer.Typer) -> None:
    app.command("eval", epilog=EPILOG)(evaluate)
