"""``melt generate``: stream text from an Ouro or MELT checkpoint, statistics on stderr."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from melt_core.errors import InvalidArgumentError
from melt_core.inference import (
    GenerateArgs,
    GenerationReport,
    GenerationResult,
    GenerationSettings,
    SamplingSettings,
    run_generate,
)
from melt_core.models import is_melt
from melt_core.words import plural

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
    int_parser,
)
from ..progress import note

EPILOG = """Examples:

  melt generate ./MELT-1.6B --prompt "The capital of France is" --loops 8

  melt generate ./Ouro-1.4B --chat --prompt "What is 17 * 23?" --max-new-tokens 512 --dtype bf16

  echo "Once upon a time" | melt generate ./MELT-1.6B --temperature 0.8 --top-p 0.95 --seed 0

  melt generate ./MELT-1.6B --prompts-file prompts.jsonl --batch-size 16 > outputs.jsonl

  melt generate ./Ouro-1.4B --prompt "2 + 2 =" --json | jq .kv_cache_bytes_per_loop

  melt generate ./MELT-1.6B --prompt "2 + 2 =" --loops 8 --exit-threshold 0.9 --json | jq .mean_loops

  melt generate ./MELT-1.6B --prompt "Once" --decode graph --json | jq .startup_seconds
"""


def _write(text: str) -> None:
    """Raw text on stdout (no rich markup or emoji processing of generated text)."""
    sys.stdout.write(text)
    sys.stdout.flush()


def _read_stdin() -> str:
    """Prompt text piped on stdin: UTF-8, else one error line (not a decoding traceback)."""
    stream = getattr(sys.stdin, "buffer", None)  # a text-only stdin (an embedding host) is already decoded
    if stream is None:
        return sys.stdin.read()
    data = stream.read()
    if b"\x00" in data:
        raise InvalidArgumentError("the text on stdin is binary data, not a prompt")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidArgumentError(
            f"the text on stdin is not UTF-8 (byte {e.start}: {data[e.start : e.start + 1]!r})"
        ) from None


def _print_stats(report: GenerationReport) -> None:
    s, hb = report.stats, console.human_bytes

    def err(text: str) -> None:  # one unwrapped line each: greppable
        console.err.print(text, soft_wrap=True)

    reasons = ", ".join(sorted({r.finish_reason for r in report.results}))
    err(f"[dim]{s.model_type} · {plural(s.loops, 'loop')} · {s.device} · {s.dtype}[/]")
    if s.mean_loops != s.loops:
        err(
            f"adaptive depth: {s.mean_loops:.2f} loops per token on average ({s.decode_mean_loops:.2f} in decoding) "
            f"of {s.loops}; {s.compute_saved:.0%} of the loop compute skipped"
        )
    err(
        f"prompt tokens: {s.prompt_tokens:,} | generated tokens: {s.generated_tokens:,} ({reasons})"
        + (f" | {s.num_prompts} prompts, batches of {s.batch_size}" if s.num_prompts > 1 else "")
    )
    err(
        f"prefill: {s.prefill_tokens_per_s:,.1f} tokens/s ({s.prefill_seconds:.3f} s) | "
        f"decode: {s.decode_tokens_per_s:,.1f} tokens/s ({s.decode_seconds:.3f} s)"
        + f" | decode path: {s.decode_path}"
        + (f" | start-up: {s.startup_seconds:.1f} s (first call of each step shape)" if s.startup_seconds else "")
    )
    if is_melt(s):
        err(
            f"KV cache: {s.kv_cache_bytes:,} B ({hb(s.kv_cache_bytes)}) for {s.kv_cache_positions:,} positions: "
            f"one shared cache for {'its loop' if s.loops == 1 else f'all {s.loops} loops'}, "
            "the same size for any loop count"
        )
    else:
        per_loop = s.kv_cache_bytes_per_loop[0]
        err(
            f"KV cache: {s.kv_cache_bytes:,} B ({hb(s.kv_cache_bytes)}) for {s.kv_cache_positions:,} positions: "
            f"{plural(s.loops, 'loop')} x {per_loop:,} B ({hb(per_loop)}) per loop"
        )
    kind = {"cuda_allocator_peak": "CUDA allocator peak", "process_peak_rss": "process peak RSS"}.get(
        s.peak_memory_kind, s.peak_memory_kind
    )
    peak = "n/a" if s.peak_memory_bytes is None else f"{s.peak_memory_bytes:,} B ({hb(s.peak_memory_bytes)})"
    err(f"peak memory: {peak} ({kind}); KV cache exactly {s.kv_cache_bytes:,} B")


G, S = GenerationSettings, SamplingSettings


def generate(
    checkpoint: Annotated[Path, typer.Argument(help="Ouro or MELT checkpoint directory.")],
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Prompt text.")] = None,
    prompt_file: Annotated[Path | None, typer.Option(help="Read the prompt from a text file.")] = None,
    prompts_file: Annotated[
        Path | None,
        typer.Option(help='Batch mode: a JSON-lines file of {"prompt": ...}; prints one JSON line per prompt.'),
    ] = None,
    chat: Annotated[
        bool, typer.Option("--chat", help="Apply the chat template (stops at <|im_end|> and EOS).")
    ] = G.chat,
    loops: Annotated[int | None, typer.Option(help="Loops per token (default: the model's total_ut_steps).")] = G.loops,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate per prompt.")] = G.max_new_tokens,
    temperature: Annotated[float, typer.Option(help="0 = greedy; above 0, sample.")] = S.temperature,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (1 = off; needs --temperature > 0).")] = S.top_p,
    top_k: Annotated[int, typer.Option(help="Sample among the k most likely tokens (0 = off).")] = S.top_k,
    seed: Annotated[
        int | None,
        typer.Option(
            parser=int_parser("--seed"),
            metavar="INTEGER",
            help="Seed of the sampling generator (reproducible samples).",
        ),
    ] = S.seed,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable); the text ends before it.")] = None,
    device: Device = GenerateArgs.device,
    dtype: Dtype = "auto",
    exit_at_step: Annotated[
        int | None, typer.Option(help="Take the logits of this loop (0-based); all loops still run.")
    ] = G.exit_at_step,
    exit_threshold: Annotated[
        float | None,
        typer.Option(
            help="Exit-gate CDF threshold (default: the config's early_exit_threshold). MELT: adaptive depth, a "
            "token stops looping once it is reached and its remaining loops are skipped. Ouro: all loops still run "
            "(a later token's loop t reads every earlier token's loop-t row); it only picks the logits."
        ),
    ] = G.exit_threshold,
    exit_kl: Annotated[
        float | None,
        typer.Option(
            help="MELT adaptive depth: a token also stops looping once its next-token distribution changes less "
            "than this many nats (KL) from one loop to the next."
        ),
    ] = G.exit_kl,
    chunk_size: ChunkSize = G.chunk_size,
    batch_size: Annotated[int, typer.Option(help="Prompts per batch with --prompts-file.")] = G.batch_size,
    decode: DecodePath = G.decode,
    compile: Compile = False,
    kv_dtype: KvDtype = G.kv_dtype,
    kv_group_size: KvGroupSize = G.kv_group_size,
    kv_residual: KvResidual = G.kv_residual,
    as_json: Json = False,
) -> None:
    """Generate text from an Ouro or MELT checkpoint; tokens stream to stdout, statistics to stderr."""
    settings = GenerationSettings(
        max_new_tokens=max_new_tokens,
        loops=loops,
        sampling=SamplingSettings(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed),
        stop=tuple(stop or ()),
        chat=chat,
        exit_at_step=exit_at_step,
        exit_threshold=exit_threshold,
        exit_kl=exit_kl,
        chunk_size=chunk_size,
        batch_size=batch_size,
        kv_dtype=kv_dtype,
        kv_group_size=kv_group_size,
        kv_residual=kv_residual,
        decode=decode_path(decode, compile),
    )
    stdin_text = None
    if prompt is None and prompt_file is None and prompts_file is None and not sys.stdin.isatty():
        stdin_text = _read_stdin()
    args = GenerateArgs(
        checkpoint=checkpoint,
        prompt=prompt,
        prompt_file=prompt_file,
        prompts_file=prompts_file,
        stdin_text=stdin_text,
        device=device,
        dtype=dtype,
        settings=settings,
    )

    def print_line(result: GenerationResult) -> None:
        _write(json.dumps(asdict(result), ensure_ascii=False) + "\n")

    line_open = False  # streamed text without its newline yet

    def stream(_: int, delta: str) -> None:
        nonlocal line_open
        _write(delta)
        line_open = not delta.endswith("\n")

    def on_event(message: str) -> None:  # "compiling the decode step ..." / "capturing ...", then how long it took
        nonlocal line_open
        if line_open:  # on a line of its own, not inside the text streamed so far (one terminal, or 2>&1)
            console.err.print()
            line_open = False
        note(message)

    if args.batch_mode:
        report = run_generate(args, on_result=print_line, on_event=on_event)
    elif as_json:
        report = run_generate(args, on_event=on_event)
        _write(json.dumps(report.to_dict(), ensure_ascii=False) + "\n")
        return
    else:
        report = run_generate(args, on_text=stream, on_event=on_event)
        _write("\n")
    _print_stats(report)


def register(app: typer.Typer) -> None:
    app.command(epilog=EPILOG)(generate)
