"""``melt pretrain``: train an Ouro-format LoopLM from scratch."""

from pathlib import Path
from typing import Annotated, Any

import typer

from melt_core.errors import InvalidArgumentError
from melt_core.training import PretrainSettings, TrainingArgs, run_pretrain
from melt_core.training.pretrain import PRETRAIN_PRESETS, PRETRAIN_TRAINING_DEFAULTS
from melt_core.training.trainer import run_directory

from .. import console
from .. import options as o
from ..progress import training_progress

EPILOG = """Examples:

  melt pretrain --data train.jsonl.gz --eval-data valid.jsonl.gz --out runs/looplm --steps 2000

  melt pretrain --data corpus/ --out runs/tiny --preset tiny --loops 4 --vocab-size 2048 --steps 50

  melt pretrain --data train.jsonl.gz --out runs/looplm --resume runs/looplm     (continue)

  melt pretrain --data train.jsonl.gz --out runs/longer --init-from example --objective ramp --steps 1000

  accelerate launch --num_processes 8 -m melt_cli pretrain --data train.jsonl.gz --out runs/looplm --fsdp
"""
P = PretrainSettings
STEPS = PRETRAIN_TRAINING_DEFAULTS["steps"]
TRAINING_DEFAULTS = {k: v for k, v in PRETRAIN_TRAINING_DEFAULTS.items() if k != "steps"}


@o.with_training_options(TRAINING_DEFAULTS)
def pretrain(
    data: o.Data,
    out: o.Out = None,
    preset: Annotated[
        str | None, typer.Option(help=f"Model shape: {', '.join(PRETRAIN_PRESETS)} [default: {P.preset}].")
    ] = None,
    loops: Annotated[int | None, typer.Option(help=f"Loops (total_ut_steps) [default: {P.loops}].")] = None,
    init_from: Annotated[
        Path | None,
        typer.Option(
            help="Start from this Ouro checkpoint (its shape, weights and tokenizer) instead of random weights."
        ),
    ] = None,
    tokenizer: Annotated[Path | None, typer.Option(help="Use this checkpoint's tokenizer (no BPE training).")] = None,
    vocab_size: Annotated[
        int | None, typer.Option(help=f"Vocabulary of the BPE trained on --data [default: {P.vocab_size}].")
    ] = None,
    objective: Annotated[
        str,
        typer.Option(help="uniform: mean per-loop CE; ramp: CE weighted by loop t; ouro: sum p_t CE_t - beta H(p)."),
    ] = P.objective,
    entropy_beta: Annotated[float, typer.Option(help="ouro objective: weight of the exit-pdf entropy.")] = (
        P.entropy_beta
    ),
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = STEPS,
    eval_data: o.EvalData = None,
    text_field: o.TextField = "text",
    training: dict[str, Any] | None = None,
) -> None:
    """Train an Ouro-format LoopLM from scratch (the teacher of MELT's post-training)."""
    if tokenizer is not None and vocab_size is not None:
        raise InvalidArgumentError("--tokenizer and --vocab-size exclude each other (the tokenizer fixes the vocab)")
    if init_from is not None:
        given = [
            flag
            for flag, value in (
                ("--preset", preset),
                ("--loops", loops),
                ("--tokenizer", tokenizer),
                ("--vocab-size", vocab_size),
            )
            if value is not None
        ]
        if given:
            raise InvalidArgumentError(f"--init-from fixes the model and tokenizer; drop {', '.join(given)}")
    settings = PretrainSettings(
        preset=P.preset if preset is None else preset,
        loops=P.loops if loops is None else loops,
        vocab_size=P.vocab_size if vocab_size is None else vocab_size,
        tokenizer=tokenizer,
        objective=objective,
        entropy_beta=entropy_beta,
        init_from=init_from,
    )
    args = TrainingArgs(out=run_directory(out, training["resume"]), steps=steps, **training)
    with training_progress(args.steps, "pretraining", args.log_every) as (on_step, on_event):
        result = run_pretrain(settings, data, args, eval_data, text_field, on_step, on_event)
    console.err.print(f"done: {result.steps} steps; Ouro checkpoint in {result.out} (try: melt info {result.out})")


def register(app: typer.Typer) -> None:
    app.command(epilog=EPILOG)(pretrain)
