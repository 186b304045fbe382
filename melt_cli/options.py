"""Option types shared by several commands (Annotated, as Typer recommends), and option-value parsers."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from melt_core.errors import InvalidArgumentError
from melt_core.models.config import validate_loops
from melt_core.training import TrainingArgs
from melt_core.training.trainer import saved_run_config

Data = Annotated[
    Path,
    typer.Option(
        "--data",
        help="Training text: .txt, .jsonl(.gz), a folder, or a saved dataset (a DatasetDict: its train split).",
    ),
]
EvalData = Annotated[Path | None, typer.Option("--eval-data", help="Held-out text for periodic evaluation.")]
TextField = Annotated[str, typer.Option(help="JSON field holding the text.")]
Out = Annotated[Path | None, typer.Option("--out", help="Run directory (the final model is written there).")]
SeqLen = Annotated[int, typer.Option(help="Tokens per training sequence.")]
BatchTokens = Annotated[
    int | None,
    typer.Option(help="Tokens per optimizer step (gradient accumulation); default: one micro-batch per process."),
]
MicroBatch = Annotated[int, typer.Option(help="Sequences per forward pass per process.")]
LR = Annotated[float, typer.Option("--lr", help="Learning rate of the base weights.")]
WeightDecay = Annotated[float, typer.Option(help="AdamW weight decay.")]
Schedule = Annotated[str, typer.Option(help="LR schedule after warm-up: cosine or constant.")]
WarmupSteps = Annotated[int | None, typer.Option(help="Warm-up steps (default: 5% of the steps).")]
Clip = Annotated[float, typer.Option(help="Gradient clipping norm (0 disables).")]
SaveEvery = Annotated[int, typer.Option(help="Save a resumable checkpoint every N steps (0: at the end only).")]
KeepLast = Annotated[int, typer.Option(help="Checkpoints kept on disk (0: all).")]
EvalEvery = Annotated[int, typer.Option(help="Evaluate every N steps (0: at the end only).")]
EvalBatches = Annotated[int, typer.Option(help="Held-out sequences per evaluation.")]


def int_parser(flag: str) -> Callable[[str], int]:
    """A parser of an integer option whose bad value (``--seed 1e20``) is one ``error:`` line, not a usage box."""

    def parse(text: str | int) -> int:
        if isinstance(text, int):  # a default value
            return text
        try:
            return int(text.replace("_", ""))
        except ValueError:
            raise InvalidArgumentError(f"{flag} takes an integer, got {text!r}") from None

    return parse


Seed = Annotated[
    int, typer.Option(parser=int_parser("--seed"), metavar="INTEGER", help="Seed of the data order and of every RNG.")
]
DataOrder = Annotated[
    str, typer.Option(help="shuffle (seeded), or file: the data's own order, e.g. a curriculum (data reasoning).")
]
MixedPrecision = Annotated[str, typer.Option(help="auto (bf16 on CUDA, none on CPU), no, bf16 or fp16.")]
Resume = Annotated[Path | None, typer.Option(help="Continue a run: its directory or one of its checkpoints.")]
Force = Annotated[bool, typer.Option("--force", help="Replace a non-empty --out.")]
LogEvery = Annotated[int, typer.Option(help="Steps between tracker logs and plain progress lines (not a terminal).")]
LogWith = Annotated[
    list[str] | None,
    typer.Option(help="Experiment tracker (repeatable): tensorboard, wandb, trackio, ... (pip install 'melt[NAME]')."),
]
SaveDtype = Annotated[str | None, typer.Option(help="dtype of the final model (default: the model's own).")]

# The optimisation and bookkeeping options of every training command, one per ``TrainingArgs`` field.
TRAINING_OPTIONS: dict[str, Any] = {
    "seq_len": SeqLen,
    "batch_tokens": BatchTokens,
    "micro_batch": MicroBatch,
    "lr": LR,
    "weight_decay": WeightDecay,
    "schedule": Schedule,
    "warmup_steps": WarmupSteps,
    "clip": Clip,
    "save_every": SaveEvery,
    "keep_last": KeepLast,
    "eval_every": EvalEvery,
    "eval_batches": EvalBatches,
    "seed": Seed,
    "data_order": DataOrder,
    "mixed_precision": MixedPrecision,
    "device": Annotated[
        str, typer.Option(help="auto (the launcher's choice: CUDA when available, else CPU), cpu, cuda or mps.")
    ],
    "resume": Resume,
    "force": Force,
    "save_dtype": SaveDtype,
    "log_every": LogEvery,
    "log_with": LogWith,
    "fsdp": Annotated[
        bool,
        typer.Option(
            "--fsdp/--no-fsdp",
            help="Shard weights, gradients and optimizer states over the processes (accelerate's FSDP2); needs a "
            "launch of 2 or more processes (docs/distributed-training.md).",
        ),
    ],
    "peak_tflops": Annotated[
        float | None,
        typer.Option(help="One device's peak TFLOP/s for the logged MFU (default: the bf16 peak of known GPUs)."),
    ],
}


# What --resume reads back from the run (not where it writes, nor whether it may replace it).
RESUMED_FIELDS = {f.name for f in dataclasses.fields(TrainingArgs)} - {"out", "resume", "force"}


def with_training_options(
    defaults: dict[str, Any] | None = None, presets: dict[str, dict[str, Any]] | None = None
) -> Callable[[Callable], Callable]:
    """Add ``TRAINING_OPTIONS`` to a command; they reach it as one ``training`` dict of
    ``TrainingArgs`` keyword arguments. Defaults are ``TrainingArgs``'s, overridden by ``defaults``
    (a core module's, e.g. pretraining's). With ``--resume``, every ``TrainingArgs`` option left at
    its default (``--steps`` too) takes the value the run was started with (its run_config.json).
    ``presets``: the command's ``--preset`` values, applied to the training options left at their
    defaults (before --resume's)."""
    fields = {f.name: f.default for f in dataclasses.fields(TrainingArgs)}
    initial = {name: fields[name] for name in TRAINING_OPTIONS} | (defaults or {})

    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command)
        own = [p for p in signature.parameters.values() if p.name != "training"]
        extra = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind, default=initial[name])
            for name, kind in TRAINING_OPTIONS.items()
        ]

        @functools.wraps(command)
        def wrapper(cli_context: typer.Context, **kwargs: Any) -> Any:
            training = {name: kwargs.pop(name) for name in TRAINING_OPTIONS}
            for name, value in (presets or {}).get(kwargs.get("preset"), {}).items():
                if name in training and cli_context.get_parameter_source(name).name == "DEFAULT":
                    training[name] = value
            if training["resume"] is not None:
                saved = saved_run_config(training["resume"])
                for group in (training, kwargs):
                    for name in group.keys() & RESUMED_FIELDS & saved.keys():
                        if cli_context.get_parameter_source(name).name == "DEFAULT":
                            group[name] = saved[name]
            return command(training=training, **kwargs)

        context = inspect.Parameter("cli_context", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
        wrapper.__signature__ = signature.replace(parameters=[*own, context, *extra])
        wrapper.__annotations__ = {
            "cli_context": typer.Context,
            **{k: v for k, v in command.__annotations__.items() if k != "training"},
            **TRAINING_OPTIONS,
        }
        return wrapper

    return decorate


# generate / eval / profile: one device and one dtype vocabulary (melt_core.runtime, melt_core.dtypes)
Device = Annotated[str, typer.Option(help="auto (CUDA when available, else CPU), cpu, cuda, cuda:N or mps.")]
Dtype = Annotated[
    str, typer.Option(help="auto (the checkpoint's stored dtype), fp32, bf16 or fp16 (or float32, bfloat16, float16).")
]
ChunkSize = Annotated[
    int | None, typer.Option(help="Prefill chunk size (default: MELT's trained chunk size; Ouro: the whole prompt).")
]
KvDtype = Annotated[
    str, typer.Option(help="How the KV cache stores rows: auto (the model's dtype), bf16, fp16, fp32, int8 or int4.")
]
KvGroupSize = Annotated[
    int | None,
    typer.Option(
        help="int8 / int4: channels that share one fp16 scale (default: the largest even divisor of the model's "
        "head_dim up to 32, i.e. 32 for head_dim 64 or 128)."
    ),
]
KvResidual = Annotated[
    int, typer.Option(help="int8 / int4: keep the most recent N positions of every slot in full precision.")
]
Json = Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of tables and text.")]


def loop_list(text: str | None) -> list[int | None]:
    """``--loops 1,2,4`` -> ``[1, 2, 4]``; not given -> ``[None]`` (the model's own loop count)."""
    if not text:
        return [None]
    return [validate_loops(n, "--loops values") for n in int_list(text, "--loops")]


def int_list(text: str, name: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]``; a clear one-line error otherwise."""
    try:
        values = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InvalidArgumentError(f"{name} takes comma-separated integers like 1,2,4, got {text!r}") from None
    if not values:
        raise InvalidArgumentError(f"{name} needs at least one value")
    return values


DecodePath = Annotated[
    str,
    typer.Option(
        "--decode",
        help="Decode path: auto (CUDA graphs on CUDA, eager elsewhere), eager, static (a fixed-shape step), "
        "graph (it captured as CUDA graphs, CUDA only) or compiled (one decoder block torch.compiled, reused by "
        "every layer and loop). The same tokens on every path; the fixed-shape ones need float KV rows and no "
        "adaptive depth, and compile or capture each new shape once.",
    ),
]
Compile = Annotated[bool, typer.Option("--compile", help="Shorthand for --decode compiled.")]


def decode_path(decode: str, compile: bool) -> str:
    """``--decode``, or ``compiled`` for ``--compile`` (which excludes another --decode)."""
    if compile and decode not in ("auto", "compiled"):
        raise InvalidArgumentError(f"--compile means --decode compiled; it excludes --decode {decode}")
    return "compiled" if compile else decode
