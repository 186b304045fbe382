"""``melt pretrain``: train an Ouro-format LoopLM from scratch."""

from pathlib import Path
from typing import Annotated

import typer

from melt_core.errors import InvalidArgumentError
from melt_core.pretrain import PRETRAIN_PRESETS, PretrainSettings, run_pretrain
from melt_core.trainer import TrainingArgs, run_directory

from .. import console
from .. import options as o
from ..progress import training_progress

EPILOG = """Examples:

  melt pretrain --data train.jsonl.gz --eval-data valid.jsonl.gz --out runs/looplm --steps 2000

  melt pretrain --data corpus/ --out runs/tiny --preset tiny --loops 4 --vocab-size 2048 --steps 50

  melt pretrain --data train.jsonl.gz --out runs/looplm --resume runs/looplm     (continue)

  melt pretrain --data train.jsonl.gz --out runs/longer --init-from example --objective ramp --steps 1000
"""


def pretrain(
    data: o.Data,
    out: o.Out = None,
    preset: Annotated[str | None, typer.Option(
        help=f"Model shape: {', '.join(PRETRAIN_PRESETS)} [default: small].")] = None,
    loops: Annotated[int | None, typer.Option(help="Loops (total_ut_steps) [default: 4].")] = None,
    init_from: Annotated[Path | None, typer.Option(
        help="Start from this Ouro checkpoint (its shape, weights and tokenizer) instead of random weights.")] = None,
    tokenizer: Annotated[Path | None, typer.Option(help="Use this checkpoint's tokenizer (no BPE training).")] = None,
    vocab_size: Annotated[int | None, typer.Option(help="Vocabulary of the BPE trained on --data [default: 4096].")] = (
        None),
    objective: Annotated[str, typer.Option(
        help="uniform: mean per-loop CE; ramp: CE weighted by loop t; ouro: sum p_t CE_t - beta H(p).")] = "uniform",
    entropy_beta: Annotated[float, typer.Option(help="ouro objective: weight of the exit-pdf entropy.")] = 0.1,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 2000,
    eval_data: o.EvalData = None,
    text_field: o.TextField = "text",
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate.")] = 2e-3,
    seq_len: o.SeqLen = 256,
    batch_tokens: o.BatchTokens = None,
    micro_batch: o.MicroBatch = 8,
    weight_decay: o.WeightDecay = 0.1,
    schedule: o.Schedule = "cosine",
    warmup_steps: o.WarmupSteps = None,
    clip: o.Clip = 1.0,
    save_every: o.SaveEvery = 200,
    keep_last: o.KeepLast = 2,
    eval_every: o.EvalEvery = 200,
    eval_batches: o.EvalBatches = 16,
    seed: o.Seed = 0,
    mixed_precision: o.MixedPrecision = "auto",
    cpu: o.Cpu = False,
    resume: o.Resume = None,
    force: o.Force = False,
    save_dtype: o.SaveDtype = None,
) -> None:
    """Train an Ouro-format LoopLM from scratch (the teacher of MELT's post-training)."""
    if tokenizer is not None and vocab_size is not None:
        raise InvalidArgumentError("--tokenizer and --vocab-size exclude each other (the tokenizer fixes the vocab)")
    if init_from is not None:
        given = [flag for flag, value in (("--preset", preset), ("--loops", loops), ("--tokenizer", tokenizer),
                                          ("--vocab-size", vocab_size)) if value is not None]
        if given:
            raise InvalidArgumentError(f"--init-from fixes the model and tokenizer; drop {', '.join(given)}")
    settings = PretrainSettings(preset=preset or "small", loops=loops or 4, vocab_size=vocab_size or 4096,
                                tokenizer=tokenizer, objective=objective, entropy_beta=entropy_beta,
                                init_from=init_from)
    args = TrainingArgs(out=run_directory(out, resume), steps=steps, seq_len=seq_len, batch_tokens=batch_tokens,
                        micro_batch=micro_batch,
                        lr=lr, weight_decay=weight_decay, schedule=schedule, warmup_steps=warmup_steps, clip=clip,
                        save_every=save_every, keep_last=keep_last, eval_every=eval_every, eval_batches=eval_batches,
                        seed=seed, mixed_precision=mixed_precision, cpu=cpu, resume=resume, force=force,
                        save_dtype=save_dtype)
    with training_progress(args.steps, "pretraining") as (on_step, on_event):
        result = run_pretrain(settings, data, args, eval_data, text_field, on_step, on_event)
    console.err.print(f"done: {result.steps} steps; Ouro checkpoint in {result.out} (try: melt info {result.out})")


def register(app: typer.Typer) -> None:
    app.command(epilog=EPILOG)(pretrain)
