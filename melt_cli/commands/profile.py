"""``melt profile memory`` and ``melt profile speed``: Ouro vs MELT, per loop count; ``melt profile
training``: the memory of a training step per GPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from melt_core.profiling import (
    MemoryEntry,
    MemoryProfileArgs,
    MemoryReport,
    SpeedProfileArgs,
    SpeedReport,
    memory_profile,
    speed_profile,
)

from .. import console
from ..options import (
    ChunkSize,
    Compile,
    DecodePath,
    Device,
    Dtype,
    Json,
    KvDtype,
    KvGroupSize,
    KvResidual,
    decode_path,
    int_list,
    int_parser,
)

MEMORY_EPILOG = """Examples:

  melt profile memory --preset ouro-1.4b --loops 4 --seq-len 32000      (the MELT paper's Table 2)

  melt profile memory --preset ouro-2.6b --loops 1,2,4,8,16 --seq-len 4096,32000 --plot memory.png

  melt profile memory ./Ouro-1.4B --measure --loops 1,2,4 --seq-len 2048 --dtype bf16 --json
"""

SPEED_EPILOG = """Examples:

  melt profile speed ./Ouro-1.4B --loops 1,2,4,8

  melt profile speed ./MELT-1.6B --loops 4 --prompt-tokens 2000 --new-tokens 64 --json

  melt profile speed example --loops 4 --compile

  melt profile speed example --loops 4 --kv-dtype int8
"""


def _csv(values: tuple[int, ...]) -> str:
    return ",".join(str(v) for v in values)


M, SP = MemoryProfileArgs, SpeedProfileArgs
profile_app = typer.Typer(help="Memory and speed of Ouro vs MELT, per loop count.", no_args_is_help=True)


def _size(n: int) -> str:
    """GB (1e9 B) and GiB for big numbers; bytes and binary units for small ones."""
    if n >= 100_000_000:
        return f"{n / 1e9:.4g} GB / {n / 2**30:.4g} GiB"
    return console.human_bytes(n)


def _per_loop(in_use: list[int]) -> str:
    """The per-loop view of a decode step: rows in use after loop 1, then what each later loop adds."""
    if not in_use:
        return "-"
    first = f"{console.human_bytes(in_use[0])} after loop 1"
    steps = {b - a for a, b in zip(in_use, in_use[1:])}
    if not steps:
        return first
    if len(steps) == 1:
        return f"{first}, +{console.human_bytes(steps.pop())} per later loop"
    return f"{first}, then " + " ".join(f"+{console.human_bytes(b - a)}" for a, b in zip(in_use, in_use[1:]))


def _print_wide(table: Table) -> None:
    """Tables keep their natural width when stdout is not a terminal (files, pipes, tests)."""
    if console.out.is_terminal:
        console.out.print(table)
    else:
        Console(file=sys.stdout, width=240, highlight=False).print(table)


def _memory_table(report: MemoryReport) -> Table:
    measured = any(e.measured is not None for e in report.entries)
    table = Table(
        title=f"memory of {report.source}: {report.dtype}, KV rows {report.kv_dtype}, batch {report.batch} "
        "(GB = 1e9 B, GiB = 2^30 B)",
        title_justify="left",
    )
    for name in ("seq len", "loops", "model", "weights", "gates", "KV cache", "total"):
        table.add_column(name, justify="left" if name == "model" else "right")
    if measured:
        for name in ("measured cache", "rows in use per loop (decode step)", "peak above baseline"):
            table.add_column(name, justify="right")
    previous: MemoryEntry | None = None
    for e in report.entries:
        if previous is not None and previous.seq_len != e.seq_len:
            table.add_section()
        previous = e
        row = [
            f"{e.seq_len:,}",
            str(e.loops),
            e.name + (" (no loops)" if e.model == "plain" else ""),
            _size(e.weights_bytes),
            _size(e.gate_bytes) if e.gate_bytes else "-",
            _size(e.kv_cache_bytes),
            _size(e.total_bytes),
        ]
        if measured:
            m = e.measured
            row += (
                ["-", "-", "-"]
                if m is None
                else [
                    _size(m.cache_bytes),
                    _per_loop(m.in_use_bytes_after_loop),
                    f"{_size(m.peak_delta_bytes)} [dim]({m.memory_kind})[/]",
                ]
            )
        table.add_row(*row)
    return table


def memory(
    checkpoint: Annotated[
        Path | None, typer.Argument(help="Checkpoint directory (config.json is enough without --measure).")
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(help="ouro-1.4b or ouro-2.6b (or their MELT names melt-1.6b, melt-3.1b): both rows are shown."),
    ] = None,
    loops: Annotated[str, typer.Option(help="Loop counts, comma-separated.")] = _csv(M.loops),
    seq_len: Annotated[str, typer.Option(help="Sequence lengths (prompt + generated), comma-separated.")] = _csv(
        M.seq_lens
    ),
    batch: Annotated[int, typer.Option(help="Sequences per batch.")] = M.batch,
    dtype: Dtype = M.dtype,
    kv_dtype: KvDtype = M.kv_dtype,
    kv_group_size: KvGroupSize = M.kv_group_size,
    kv_residual: KvResidual = M.kv_residual,
    measure: Annotated[
        bool,
        typer.Option("--measure", help="Also run a real prefill + decode per loop count and sequence length on CKPT."),
    ] = False,
    device: Device = M.device,
    chunk_size: ChunkSize = M.chunk_size,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG of memory vs loops (needs matplotlib).")] = None,
    as_json: Json = False,
) -> None:
    """Memory of Ouro, MELT and a plain model per loop count and sequence length: weights, gates, KV cache."""
    args = MemoryProfileArgs(
        checkpoint=checkpoint,
        preset=preset,
        loops=int_list(loops, "--loops"),
        seq_lens=int_list(seq_len, "--seq-len"),
        batch=batch,
        dtype=dtype,
        measure=measure,
        device=device,
        chunk_size=chunk_size,
        kv_dtype=kv_dtype,
        kv_group_size=kv_group_size,
        kv_residual=kv_residual,
    )
    if plot is not None:
        from ..plots import check_plot_path

        check_plot_path(plot)
    with console.err.status("profiling memory") as status:
        report = memory_profile(args, progress=lambda msg: status.update(msg))
    if plot is not None:
        from ..plots import plot_memory

        plot_memory(report, plot)
        console.err.print(f"wrote {plot}")
    if as_json:
        console.out.print_json(json.dumps(report.to_dict()))
    else:
        _print_wide(_memory_table(report))


def _speed_table(report: SpeedReport) -> Table:
    startup = ""
    if report.decode_path != "eager":
        seconds = report.startup_seconds
        startup = f" (start-up: Ouro {seconds['ouro']:.1f} s, MELT {seconds['melt']:.1f} s)"
    table = Table(
        title=f"speed on {report.device}, {report.dtype}, KV rows {report.kv_dtype}, batch {report.batch}: "
        f"{report.prompt_tokens} prompt tokens, {report.new_tokens} new tokens; decode {report.decode_path}"
        f"{startup}\nx floor: a decode step's time over the bytes it reads / the measured copy bandwidth "
        f"({report.bandwidth / 1e9:,.1f} GB/s)\nOuro: {report.ouro_source}\nMELT: {report.melt_source}",
        title_justify="left",
    )
    for name in (
        "loops",
        "Ouro prefill tokens/s",
        "MELT prefill tokens/s",
        "MELT/Ouro",
        "Ouro decode tokens/s",
        "MELT decode tokens/s",
        "MELT/Ouro ",
        "Ouro x floor",
        "MELT x floor",
        "KV Ouro",
        "KV MELT",
    ):
        table.add_column(name, justify="right")
    for r in report.rows:
        table.add_row(
            str(r.loops),
            f"{r.ouro.prefill_tokens_per_s:,.1f}",
            f"{r.melt.prefill_tokens_per_s:,.1f}",
            f"{r.prefill_ratio:.2f}x",
            f"{r.ouro.decode_tokens_per_s:,.1f}",
            f"{r.melt.decode_tokens_per_s:,.1f}",
            f"{r.decode_ratio:.2f}x",
            f"{r.x_floor('ouro'):.2f}",
            f"{r.x_floor('melt'):.2f}",
            console.human_bytes(r.ouro.cache_bytes),
            console.human_bytes(r.melt.cache_bytes),
        )
    return table


def speed(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            help="Ouro checkpoint (converted in memory) or MELT checkpoint (its melt.source is the Ouro side)."
        ),
    ],
    loops: Annotated[str, typer.Option(help="Loop counts, comma-separated.")] = _csv(SP.loops),
    prompt_tokens: Annotated[int, typer.Option(help="Prompt length (random token ids, the same for both).")] = (
        SP.prompt_tokens
    ),
    new_tokens: Annotated[int, typer.Option(help="Tokens decoded one at a time.")] = SP.new_tokens,
    batch: Annotated[int, typer.Option(help="Sequences per batch.")] = SP.batch,
    dtype: Dtype = "auto",
    device: Device = SP.device,
    chunk_size: ChunkSize = SP.chunk_size,
    seed: Annotated[
        int, typer.Option(parser=int_parser("--seed"), metavar="INTEGER", help="Seed of the random prompt.")
    ] = SP.seed,
    rounds: Annotated[
        int, typer.Option(help="Timed rounds; Ouro and MELT alternate every round, the median round is shown.")
    ] = SP.rounds,
    decode: DecodePath = SP.decode,
    compile: Compile = False,
    kv_dtype: KvDtype = SP.kv_dtype,
    kv_group_size: KvGroupSize = SP.kv_group_size,
    kv_residual: KvResidual = SP.kv_residual,
    as_json: Json = False,
) -> None:
    """Prefill and decode tokens/s of an Ouro model and its MELT conversion, side by side, vs the bandwidth floor."""
    args = SpeedProfileArgs(
        checkpoint=checkpoint,
        loops=int_list(loops, "--loops"),
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        batch=batch,
        dtype=dtype,
        device=device,
        chunk_size=chunk_size,
        seed=seed,
        rounds=rounds,
        decode=decode_path(decode, compile),
        kv_dtype=kv_dtype,
        kv_group_size=kv_group_size,
        kv_residual=kv_residual,
    )
    with console.err.status("timing") as status:
        report = speed_profile(args, progress=lambda msg: status.update(msg))
    if as_json:
        console.out.print_json(json.dumps(report.to_dict()))
    else:
        _print_wide(_speed_table(report))


TRAINING_EPILOG = """Examples:

  melt profile training --preset ouro-1.4b --phase 1 --seq-len 10000 --chunk-size 500 --world-size 8

  melt profile training --preset ouro-1.4b --phase 2 --seq-len 10000 --chunk-size 500 --json

  melt profile training ./MELT-small --phase 1 --seq-len 2048 --measure --device cpu
"""

Phase = Annotated[str, typer.Option(help="1 or 2 (MELT distillation from its Ouro teacher) or pretrain (Ouro).")]


def _training_table(plan) -> Table:
    ck = "on" if plan.checkpoint_chunks else "off"
    table = Table(
        title=f"one training step of {plan.model} ({plan.source}), phase {plan.phase}, on {plan.device}:\n"
        f"{plan.micro_batch} x {plan.seq_len:,} tokens, chunks of {plan.chunk_size or '-'} (checkpointed: {ck}), "
        f"{plan.world_size} process(es){', FSDP' if plan.fsdp else ''} — per GPU (GB = 1e9 B)",
        title_justify="left",
    )
    table.add_column("what")
    table.add_column("planned", justify="right")
    rows = [
        ("weights (fp32 master)", plan.weights_bytes),
        ("gradients (fp32)", plan.gradients_bytes),
        ("optimizer (AdamW moments)", plan.optimizer_bytes),
        ("teacher", plan.teacher_bytes),
        ("activations", plan.activations_bytes),
        ("loss buffers", plan.loss_buffers_bytes),
        ("other (autocast casts, FSDP / DDP buffers)", plan.other_bytes),
    ]
    for name, n in rows:
        table.add_row(name, _size(n))
    table.add_section()
    table.add_row(f"[bold]peak per GPU[/] (at the {plan.peak_at})", f"[bold]{_size(plan.peak_bytes_per_gpu)}[/]")
    table.add_row("held between steps", _size(plan.held_between_steps_bytes))
    table.add_row("model FLOPs per token", f"{plan.flops_per_token / 1e9:,.2f} GFLOP")
    m = plan.measured
    if m is not None:
        table.add_section()
        table.add_row(f"measured peak ({m.memory_kind})", _size(m.measured_peak_bytes))
        ratio = m.step_peak_bytes / max(plan.step_bytes, 1)
        table.add_row(
            "measured step above baseline / planned",
            f"{_size(m.step_peak_bytes)} / {_size(plan.step_bytes)} ({ratio:.2f}x)",
        )
        table.add_row("measured tokens/s", f"{m.tokens_per_s:,.1f}")
    return table


def training(
    checkpoint: Annotated[
        Path | None,
        typer.Argument(help="MELT checkpoint (phases 1, 2) or Ouro checkpoint (pretrain); config.json is enough."),
    ] = None,
    preset: Annotated[str | None, typer.Option(help="ouro-1.4b or ouro-2.6b (or melt-1.6b, melt-3.1b).")] = None,
    phase: Phase = "1",
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 2048,
    chunk_size: Annotated[int | None, typer.Option(help="MELT training chunk size (default: the config's).")] = None,
    micro_batch: Annotated[int, typer.Option(help="Sequences per forward per process.")] = 1,
    world_size: Annotated[int, typer.Option(help="Processes (GPUs) of the launch.")] = 1,
    fsdp: Annotated[
        bool | None, typer.Option("--fsdp/--no-fsdp", help="Shard over the processes (default: on with 2 or more).")
    ] = None,
    checkpoint_chunks: Annotated[
        bool, typer.Option("--checkpoint-chunks/--no-checkpoint-chunks", help="Recompute each chunk in backward.")
    ] = True,
    device: Annotated[
        str, typer.Option(help="cuda (bf16 autocast) or cpu (fp32); auto: cuda, or where --measure runs.")
    ] = "auto",
    measure: Annotated[
        bool, typer.Option("--measure", help="Also run one real training step of CKPT and measure its peak.")
    ] = False,
    data: Annotated[Path | None, typer.Option(help="Text for the measured step (default: random tokens).")] = None,
    as_json: Json = False,
) -> None:
    """Memory of one training step per GPU: weights, gradients, optimizer, teacher, activations, loss buffers."""
    from melt_core.profiling.training import TrainingPlanArgs, training_plan

    args = TrainingPlanArgs(
        checkpoint=checkpoint,
        preset=preset,
        phase=phase,
        seq_len=seq_len,
        chunk_size=chunk_size,
        micro_batch=micro_batch,
        world_size=world_size,
        fsdp=fsdp,
        checkpoint_chunks=checkpoint_chunks,
        device=device,
        measure=measure,
        data=data,
    )
    with console.err.status("measuring a training step" if measure else "planning"):
        plan = training_plan(args)
    if as_json:
        console.out.print_json(json.dumps(plan.to_dict()))
    else:
        _print_wide(_training_table(plan))


profile_app.command(epilog=MEMORY_EPILOG)(memory)
profile_app.command(epilog=SPEED_EPILOG)(speed)
profile_app.command(epilog=TRAINING_EPILOG)(training)


def register(app: typer.Typer) -> None:
    app.add_typer(profile_app, name="profile")
