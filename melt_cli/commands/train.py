"""``melt transition`` (phase 1) and ``melt distill --phase 1|2|all``: MELT post-training."""

import inspect
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Any

import typer

from melt_core.errors import InvalidArgumentError
from melt_core.training import DataArgs, DistillSettings, TrainingArgs, run_both_phases, run_phase
from melt_core.training.distill import DISTILL_PRESETS
from melt_core.training.trainer import run_directory, wants_fsdp

from .. import console
from .. import options as o
from ..progress import training_progress

EPILOG = """Examples:

  melt transition ./MELT-1.6B --data train.jsonl.gz --out runs/phase1 --steps 500

  melt distill --phase 2 runs/phase1 --teacher ./Ouro-1.4B --data train.jsonl.gz --out runs/phase2

  melt distill --phase all ./MELT-1.6B --data train.jsonl.gz --out runs/melt --preset paper     (the paper's run)

  accelerate launch --num_processes 8 -m melt_cli distill --phase 2 runs/phase1 --data train.jsonl.gz --out runs/p2

  accelerate launch --num_processes 8 -m melt_cli transition ./MELT-1.6B --data train.jsonl.gz --out runs/p1 --fsdp

  torchrun --standalone --nproc_per_node 2 -m melt_cli transition ./MELT-1.6B --data t.jsonl --out runs/cpu  (CPUs)

  melt distill --phase 2 runs/phase1 --data train.jsonl.gz --resume runs/p2      (continue an interrupted run)
"""
D = DistillSettings


QUICK = {k: v for k, v in DISTILL_PRESETS["quick"].items() if k != "steps"}


@o.with_training_options(QUICK, presets=DISTILL_PRESETS)
def distill(
    student: Annotated[Path, typer.Argument(help="MELT checkpoint (from melt convert, or a phase-1 output).")],
    data: o.Data,
    phase: Annotated[str, typer.Option(help="1 (transition), 2 (attention-aligned distillation), or all.")] = "2",
    teacher: Annotated[Path | None, typer.Option(help="Ouro teacher (default: the convert source).")] = None,
    out: o.Out = None,
    preset: Annotated[
        str,
        typer.Option(
            help="quick: minutes on a CPU (100 + 60 steps of 512 tokens); paper: the MELT paper's run "
            "(500 + 300 steps, --seq-len 10000 --batch-tokens 320000 --checkpoint-chunks). Options you give win."
        ),
    ] = "quick",
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (default: the preset's, per phase).")] = None,
    eval_data: o.EvalData = None,
    text_field: o.TextField = "text",
    beta: Annotated[float, typer.Option(help="Phase 2: weight of the attention alignment.")] = D.beta,
    ce_weight: Annotated[float, typer.Option(help="Weight of a next-token CE term (mean over loops).")] = D.ce_weight,
    kd_loops: Annotated[str, typer.Option(help="KD on all loops or the final loop only.")] = D.kd_loops,
    chunk_size: Annotated[int | None, typer.Option(help="Student chunk size (default: the model's).")] = D.chunk_size,
    detach_history: Annotated[bool, typer.Option(help="Cut gradients through earlier chunks' rows.")] = (
        D.detach_history
    ),
    checkpoint_chunks: Annotated[
        bool | None,
        typer.Option(
            "--checkpoint-chunks/--no-checkpoint-chunks",
            help="Recompute each chunk in backward (less memory; default: on with --preset paper, else off).",
            show_default=False,
        ),
    ] = None,
    freeze_base: Annotated[bool, typer.Option(help="Train only the gates.")] = D.freeze_base,
    shard_teacher: Annotated[
        bool,
        typer.Option(
            "--shard-teacher/--replicate-teacher",
            help="With --fsdp: shard the teacher too (gathered for each of its forwards), not a copy per process.",
        ),
    ] = D.shard_teacher,
    gate_lr: Annotated[float, typer.Option(help="Learning rate of the gates.")] = TrainingArgs.gate_lr,
    teacher_dtype: Annotated[str | None, typer.Option(help="Teacher dtype (default: bf16 on CUDA, else fp32).")] = None,
    training: dict[str, Any] | None = None,
) -> None:
    """Post-train a MELT model from its Ouro teacher: phase 1, phase 2, or both in sequence."""
    if phase not in ("1", "2", "all"):
        raise InvalidArgumentError(f"--phase must be 1, 2 or all, got {phase!r}")
    if preset not in DISTILL_PRESETS:
        raise InvalidArgumentError(f"--preset must be one of {', '.join(DISTILL_PRESETS)}, got {preset!r}")
    preset_steps = DISTILL_PRESETS[preset]["steps"]
    settings = DistillSettings(
        phase=2 if phase == "all" else int(phase),
        beta=beta,
        ce_weight=ce_weight,
        kd_loops=kd_loops,
        chunk_size=chunk_size,
        detach_history=detach_history,
        checkpoint_chunks=DISTILL_PRESETS[preset].get("checkpoint_chunks", D.checkpoint_chunks)
        if checkpoint_chunks is None
        else checkpoint_chunks,
        freeze_base=freeze_base,
        shard_teacher=shard_teacher,
    )
    if shard_teacher and not wants_fsdp(training["fsdp"]):
        raise InvalidArgumentError("--shard-teacher shards the teacher over an FSDP run: add --fsdp")
    data_args = DataArgs(data, eval_data, text_field)
    run_dir = run_directory(out, training["resume"])
    if phase == "all":
        base = TrainingArgs(out=run_dir, steps=1, gate_lr=gate_lr, **training)  # steps are set per phase
        with ExitStack() as bar:

            def on_phase(n: int, args: TrainingArgs) -> tuple:
                bar.close()  # one live progress bar at a time
                return bar.enter_context(training_progress(args.steps, f"phase {n}", args.log_every))

            _, final = run_both_phases(
                student,
                teacher,
                settings,
                data_args,
                base,
                steps=steps,
                default_steps=preset_steps,
                teacher_dtype=teacher_dtype,
                on_phase=on_phase,
            )
        console.err.print(f"both phases done; the final MELT checkpoint is {final.out}")
        return
    args = TrainingArgs(
        out=run_dir, steps=preset_steps[settings.phase] if steps is None else steps, gate_lr=gate_lr, **training
    )
    with training_progress(args.steps, f"phase {settings.phase}", args.log_every) as (on_step, on_event):
        result = run_phase(student, teacher, settings, data_args, args, teacher_dtype, on_step, on_event)
    loss = result.last_metrics.get("loss", float("nan"))
    console.err.print(
        f"phase {settings.phase} done: {result.steps} steps, final loss {loss:.4f}; model in {result.out}"
    )


def transition(**kwargs) -> None:
    """Phase 1: the interpolated transition from Ouro's per-loop KV to MELT's shared KV (distill --phase 1)."""
    distill(phase="1", beta=0.0, **kwargs)  # type: ignore[arg-type]


# `transition` takes every option of `distill` but --phase and --beta (the alignment is phase 2's).
_signature = inspect.signature(distill)
transition.__signature__ = _signature.replace(
    parameters=[p for p in _signature.parameters.values() if p.name not in ("phase", "beta")]
)
transition.__annotations__ = {k: v for k, v in distill.__annotations__.items() if k not in ("phase", "beta")}


def register(app: typer.Typer) -> None:
    app.command(epilog=EPILOG)(transition)
    app.command(epilog=EPILOG)(distill)
