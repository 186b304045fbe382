"""``melt transition`` (phase 1) and ``melt distill --phase 1|2|all``: MELT post-training."""


import inspect
from pathlib import Path
from typing import Annotated

import typer

from melt_core.distill import DataArgs, DistillSettings, run_phase
from melt_core.errors import InvalidArgumentError
from melt_core.trainer import TrainingArgs, run_directory

from .. import console
from .. import options as o
from ..progress import training_progress

DEFAULT_STEPS = {1: 500, 2: 300}

EPILOG = """Examples:

  melt transition ./MELT-1.6B --data train.jsonl.gz --out runs/phase1 --steps 500

  melt distill --phase 2 runs/phase1 --teacher ./Ouro-1.4B --data train.jsonl.gz --out runs/phase2

  melt distill --phase all ./MELT-1.6B --data train.jsonl.gz --out runs/melt --seq-len 10000 --batch-tokens 320000

  accelerate launch --num_processes 8 -m melt_cli distill --phase 2 runs/phase1 --data train.jsonl.gz --out runs/p2

  melt distill --phase 2 runs/phase1 --data train.jsonl.gz --resume runs/p2      (continue an interrupted run)
"""


def _train_phase(phase: int, student: Path, teacher: Path | None, data: Path, eval_data: Path | None,
                 text_field: str, out: Path | None, steps: int | None, settings: dict, targs: dict,
                 teacher_dtype: str | None) -> Path:
    args = TrainingArgs(out=run_directory(out, targs.get("resume")), steps=steps or DEFAULT_STEPS[phase], **targs)
    with training_progress(args.steps, f"phase {phase}") as (on_step, on_event):
        result = run_phase(student, teacher, DistillSettings(phase=phase, **settings),
                           DataArgs(data, eval_data, text_field), args, teacher_dtype, on_step, on_event)
    loss = result.last_metrics.get("loss", float("nan"))
    console.err.print(f"phase {phase} done: {result.steps} steps, final loss {loss:.4f}; model in {result.out}")
    return result.out


def distill(
    student: Annotated[Path, typer.Argument(help="MELT checkpoint (from melt convert, or a phase-1 output).")],
    data: o.Data,
    phase: Annotated[str, typer.Option(help="1 (transition), 2 (attention-aligned distillation), or all.")] = "2",
    teacher: Annotated[Path | None, typer.Option(help="Ouro teacher (default: the convert source).")] = None,
    out: o.Out = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (default: 500 phase 1, 300 phase 2).")] = None,
    eval_data: o.EvalData = None,
    text_field: o.TextField = "text",
    beta: Annotated[float, typer.Option(help="Phase 2: weight of the attention alignment.")] = 0.1,
    ce_weight: Annotated[float, typer.Option(help="Weight of a next-token CE term (mean over loops).")] = 0.0,
    kd_loops: Annotated[str, typer.Option(help="KD on all loops or the final loop only.")] = "all",
    chunk_size: Annotated[int | None, typer.Option(help="Student chunk size (default: the model's).")] = None,
    detach_history: Annotated[bool, typer.Option(help="Cut gradients through earlier chunks' rows.")] = False,
    checkpoint_chunks: Annotated[bool, typer.Option(help="Recompute each chunk in backward (less memory).")] = False,
    freeze_base: Annotated[bool, typer.Option(help="Train only the gates.")] = False,
    gate_lr: Annotated[float, typer.Option(help="Learning rate of the gates.")] = 5e-4,
    lr: o.LR = 8e-6,
    teacher_dtype: Annotated[str | None, typer.Option(help="Teacher dtype (default: bf16 on CUDA, else fp32).")] = None,
    seq_len: o.SeqLen = 2048,
    batch_tokens: o.BatchTokens = None,
    micro_batch: o.MicroBatch = 1,
    weight_decay: o.WeightDecay = 0.0,
    schedule: o.Schedule = "cosine",
    warmup_steps: o.WarmupSteps = None,
    clip: o.Clip = 1.0,
    save_every: o.SaveEvery = 0,
    keep_last: o.KeepLast = 2,
    eval_every: o.EvalEvery = 0,
    eval_batches: o.EvalBatches = 8,
    seed: o.Seed = 0,
    mixed_precision: o.MixedPrecision = "auto",
    cpu: o.Cpu = False,
    resume: o.Resume = None,
    force: o.Force = False,
    save_dtype: o.SaveDtype = None,
) -> None:
    """Post-train a MELT model from its Ouro teacher: phase 1, phase 2, or both in sequence."""
    if phase not in ("1", "2", "all"):
        raise InvalidArgumentError(f"--phase must be 1, 2 or all, got {phase!r}")
    settings = dict(beta=beta, ce_weight=ce_weight, kd_loops=kd_loops, chunk_size=chunk_size,
                    detach_history=detach_history, checkpoint_chunks=checkpoint_chunks, freeze_base=freeze_base)
    targs = dict(seq_len=seq_len, batch_tokens=batch_tokens, micro_batch=micro_batch, lr=lr, gate_lr=gate_lr,
                 weight_decay=weight_decay, schedule=schedule, warmup_steps=warmup_steps, clip=clip,
                 save_every=save_every, keep_last=keep_last, eval_every=eval_every, eval_batches=eval_batches,
                 seed=seed, mixed_precision=mixed_precision, cpu=cpu, resume=resume, force=force,
                 save_dtype=save_dtype)
    common = dict(teacher=teacher, data=data, eval_data=eval_data, text_field=text_field,
                  settings=settings, teacher_dtype=teacher_dtype)
    if phase != "all":
        _train_phase(int(phase), student, out=out, steps=steps, targs=targs, **common)
        return
    if resume is not None:
        raise InvalidArgumentError("--resume continues one phase; rerun that phase with --phase 1 or --phase 2")
    if out is None:
        raise InvalidArgumentError("--out is required")
    if teacher is None:
        from melt_core.distill import default_teacher

        common["teacher"] = Path(default_teacher(student))
    first = _train_phase(1, student, out=out / "phase1", steps=steps, targs=targs, **common)
    final = _train_phase(2, first, out=out / "phase2", steps=steps, targs=targs, **common)
    console.err.print(f"both phases done; the final MELT checkpoint is {final}")


def transition(**kwargs) -> None:
    """Phase 1: the interpolated transition from Ouro's per-loop KV to MELT's shared KV (distill --phase 1)."""
    distill(phase="1", beta=0.0, **kwargs)  # type: ignore[arg-type]


# `transition` takes every option of `distill` but --phase and --beta (the alignment is phase 2's).
_signature = inspect.signature(distill)
transition.__signature__ = _signature.replace(
    parameters=[p for p in _signature.parameters.values() if p.name not in ("phase", "beta")]
)


def register(app: typer.Typer) -> None:
    app.command(epilog=EPILOG)(transition)
    app.command(epilog=EPILOG)(distill)
