"""``melt quickstart``: convert -> transition -> distill -> eval -> generate -> memory, on the example model;
then the same recipe on the reasoning model, judged by accuracy."""

from pathlib import Path
from typing import Annotated

import typer
from rich.panel import Panel
from rich.table import Table

from melt_core.quickstart import QuickstartReport, QuickstartSettings, run_quickstart

from .. import console
from ..progress import stage_progress

EPILOG = """Examples:

  melt quickstart

  melt quickstart --out runs/quickstart --steps1 100 --steps2 60 --force
"""


def quickstart(
    out: Annotated[Path, typer.Option(help="Where the converted and trained models go.")] = Path("melt-quickstart"),
    steps1: Annotated[int, typer.Option(help="Phase-1 (transition) steps.")] = QuickstartSettings.steps1,
    steps2: Annotated[int, typer.Option(help="Phase-2 (distillation) steps.")] = QuickstartSettings.steps2,
    teacher: Annotated[str, typer.Option(help="The Ouro LoopLM to start from.")] = QuickstartSettings.teacher,
    seq_len: Annotated[int, typer.Option(help="Tokens per training and evaluation sequence.")] = (
        QuickstartSettings.seq_len
    ),
    batch_tokens: Annotated[int, typer.Option(help="Tokens per optimizer step (a multiple of --seq-len).")] = (
        QuickstartSettings.batch_tokens
    ),
    eval_sequences: Annotated[
        int, typer.Option(help="Held-out sequences to evaluate on (the shipped slice has 48 of 256 tokens).")
    ] = (QuickstartSettings.eval_sequences),
    reasoning: Annotated[
        bool, typer.Option(help="Also run the recipe on the built-in reasoning model (accuracy on multi-hop problems).")
    ] = QuickstartSettings.reasoning,
    reasoning_steps1: Annotated[int, typer.Option(help="Reasoning: phase-1 steps.")] = (
        QuickstartSettings.reasoning_steps1
    ),
    reasoning_steps2: Annotated[int, typer.Option(help="Reasoning: phase-2 steps.")] = (
        QuickstartSettings.reasoning_steps2
    ),
    reasoning_problems: Annotated[int, typer.Option(help="Reasoning: held-out problems per hop count.")] = (
        QuickstartSettings.reasoning_problems
    ),
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out.")] = False,
) -> None:
    """Run the whole MELT pipeline on the built-in example LoopLM (a few minutes on a CPU)."""
    settings = QuickstartSettings(
        teacher=teacher,
        steps1=steps1,
        steps2=steps2,
        seq_len=seq_len,
        batch_tokens=batch_tokens,
        eval_sequences=eval_sequences,
        reasoning=reasoning,
        reasoning_steps1=reasoning_steps1,
        reasoning_steps2=reasoning_steps2,
        reasoning_problems=reasoning_problems,
    )
    with stage_progress() as stages:
        report = run_quickstart(
            out,
            settings,
            force=force,
            on_stage=stages.stage,
            on_step=stages.step,
            on_event=stages.event,
            on_progress=stages.count,
        )
    render(report)


def render(report: QuickstartReport) -> None:
    evaluation = Table(
        title="Held-out loss (melt_core/assets/quickstart/valid.jsonl.gz), last loop", title_justify="left"
    )
    # 80 columns: model names whole (no_wrap), "KL to teacher" rather than "KL(teacher‖model)"
    for col in ("model", "loss", "perplexity", "KL to teacher", "top-1 agreement"):
        evaluation.add_column(col, justify="right" if col != "model" else "left", no_wrap=col == "model")
    for name, results in report.evaluation.items():
        r = results[-1]
        kl = "-" if r.kl_to_teacher is None else f"{r.kl_to_teacher:.4f}"
        agree = "-" if r.top1_agreement is None else f"{r.top1_agreement:.1%}"
        evaluation.add_row(name, f"{r.loss:.4f}", f"{r.perplexity:.2f}", kl, agree)
    console.out.print(evaluation)

    memory = Table(
        title="KV cache (bf16) of the example model: Ouro keeps a row per loop, MELT one per layer",
        title_justify="left",
    )
    for col in ("loops", "Ouro B/token", "MELT B/token", "Ouro cache, 4096 tok", "MELT cache, 4096 tok", "ratio"):
        memory.add_column(col, justify="right")
    for loops, kv in report.kv_bytes.items():
        measured = report.measured_cache_bytes[loops]
        memory.add_row(
            str(loops),
            f"{kv['ouro']:,}",
            f"{kv['melt']:,}",
            console.human_bytes(measured["ouro"]),
            console.human_bytes(measured["melt"]),
            f"{kv['ouro'] / kv['melt']:.0f}x",
        )
    console.out.print(memory)
    for name, text in report.samples.items():
        console.out.print(Panel(text, title=name, title_align="left"))
    if report.reasoning:
        render_reasoning(report)
    timing = ", ".join(f"{k} {v:.0f}s" for k, v in report.seconds.items())
    console.out.print(f"done in {sum(report.seconds.values()):.0f}s ({timing}); models in {report.out}")


def render_reasoning(report: QuickstartReport) -> None:
    table = Table(title="Multi-hop reasoning, greedy accuracy on held-out problems", title_justify="left")
    hops = sorted({int(k) for r in report.reasoning.values() for k in r["by_hops"]})
    per_hop = f"% by hop count ({hops[0]}..{hops[-1]})" if hops else "% by hop count"
    for col in ("model", "accuracy", per_hop, "KV B/token (bf16)"):
        table.add_column(col, justify="right" if col != "model" else "left", no_wrap=col == "model")
    for name, r in report.reasoning.items():
        by_hops = {int(k): v for k, v in r["by_hops"].items()}
        table.add_row(
            name,
            f"{r['accuracy']:.1%}",
            " ".join(f"{100 * by_hops[k]:.0f}" if k in by_hops else "-" for k in hops),
            f"{r['kv_bytes_per_token']:,}",
        )
    console.out.print(table)
    melt, mean = report.reasoning.get("MELT (phase 1 + 2)"), report.reasoning.get("training-free mean")
    if melt and mean:
        verdict = "above" if melt["accuracy"] > mean["accuracy"] else "not above"
        console.out.print(
            f"At this budget the trained MELT is {verdict} the training-free 'mean', on too few problems to tell "
            "differences of a few points apart; over 3 seeds and 2,000 problems (docs/reasoning.md) 150 + 100 steps "
            "put the gate 3 points above 'mean', and more steps (--reasoning-steps1/--reasoning-steps2) add more."
        )


def register(app: typer.Typer) -> None:
    app.command(epilog=EPILOG)(quickstart)
