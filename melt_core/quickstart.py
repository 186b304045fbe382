"""``melt quickstart``: the whole MELT pipeline on the built-in example LoopLM, on a CPU, in minutes.

convert -> phase 1 (transition) -> phase 2 (distillation) -> evaluation of the teacher, MELT and the
training-free ``last`` baseline -> one sample generation from each -> KV-cache memory of Ouro vs MELT
-> the same recipe on the built-in ``reasoning`` LoopLM, judged by accuracy on multi-hop problems.
Everything it needs is installed with the package (models, training and held-out text) or made by
melt itself (the reasoning problems).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .cache import KVCache
from .checkpoints import convert_ouro_to_melt, fresh_output_dir, load_config, load_model, load_tokenizer
from .checkpoints.builtin import ASSETS
from .errors import InvalidArgumentError
from .evaluation import EvalSettings, LoopResult, evaluate_checkpoint, evaluate_problems
from .inference import GenerationSettings, SamplingSettings, generate_text
from .models import MeltSettings
from .tasks import ChainTask, make_problems, write_problems
from .tasks.chains import TRAINED_HOPS
from .training import DataArgs, DistillSettings, TrainingArgs, run_phase
from .words import plural

TRAIN_TEXT = ASSETS / "quickstart" / "train.jsonl.gz"
VALID_TEXT = ASSETS / "quickstart" / "valid.jsonl.gz"
PROMPT = "The state of the Union is"
REASONING_HOPS = tuple(TRAINED_HOPS)  # held-out hop counts: every depth the task has
# Post-training the reasoning model: a small model trained from scratch takes far larger steps
# than the paper's (8e-6 / 5e-4, for Ouro-1.4B); benchmarks/bench_reasoning.py uses the same.
REASONING_LR = {"lr": 3e-4, "gate_lr": 3e-3}


@dataclass
class QuickstartSettings:
    teacher: str = "example"
    steps1: int = 40
    steps2: int = 30
    seq_len: int = 256
    chunk_size: int = 64
    batch_tokens: int = 1024
    eval_sequences: int = 48  # all of the shipped held-out slice: 16 sequences were too few to rank MELT vs last
    new_tokens: int = 40
    kv_loops: tuple[int, ...] = (1, 4, 16)
    kv_tokens: int = 4096
    prompt: str = PROMPT
    reasoning: bool = True  # the reasoning stage
    reasoning_teacher: str = "reasoning"
    reasoning_steps1: int = 100
    reasoning_steps2: int = 60
    reasoning_batch: int = 64  # problems per step
    reasoning_chunk_size: int = 4
    reasoning_problems: int = 50  # held-out problems per hop count

    def __post_init__(self) -> None:
        for flag, value in (
            ("--steps1", self.steps1),
            ("--steps2", self.steps2),
            ("--eval-sequences", self.eval_sequences),
            ("new tokens", self.new_tokens),
            ("--reasoning-steps1", self.reasoning_steps1),
            ("--reasoning-steps2", self.reasoning_steps2),
            ("--reasoning-problems", self.reasoning_problems),
        ):
            if value < 1:
                raise InvalidArgumentError(f"{flag} must be >= 1, got {value}")
        if self.seq_len < 2 or self.batch_tokens < self.seq_len or self.batch_tokens % self.seq_len:
            raise InvalidArgumentError(
                f"--batch-tokens ({self.batch_tokens}) must be a positive multiple of "
                f"--seq-len ({self.seq_len}, at least 2)"
            )


@dataclass
class QuickstartReport:
    out: Path
    evaluation: dict[str, list[LoopResult]] = field(default_factory=dict)  # model -> per-loop results
    kv_bytes: dict[int, dict[str, int]] = field(default_factory=dict)  # loops -> {"ouro": B/token, "melt": ...}
    measured_cache_bytes: dict[int, dict[str, int]] = field(default_factory=dict)  # loops -> cache.nbytes()
    samples: dict[str, str] = field(default_factory=dict)
    # model -> {"accuracy", "by_hops" {hops: accuracy}, "kv_bytes_per_token" (bf16)}
    reasoning: dict[str, dict] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def run_quickstart(
    out: str | os.PathLike,
    settings: QuickstartSettings | None = None,
    *,
    force: bool = False,
    on_stage: Callable[[str, int | None], None] | None = None,
    on_step=None,
    on_event=None,
    on_progress: Callable[[int, int, str, str], None] | None = None,
) -> QuickstartReport:
    """Run every stage; ``on_stage(message, training_steps or None)`` announces each one, then a
    training stage reports each step (``on_step(metrics)``, ``on_event(message)``) and every other
    long one its work as it goes: ``on_progress(done, total, unit, model)`` (e.g. 96, 144,
    "sequences", "MELT (phase 1 + 2)")."""
    s = settings or QuickstartSettings()
    stage = on_stage or (lambda message, steps: None)
    progress = on_progress or (lambda done, total, unit, model: None)
    out = fresh_output_dir(out, force, keep=[s.teacher, s.reasoning_teacher])
    total = 7 if s.reasoning else 6
    report = QuickstartReport(out)
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        report.seconds[name] = time.perf_counter() - clock
        clock = time.perf_counter()

    stage(f"1/{total} convert {s.teacher} -> MELT (element-wise gate) and the training-free 'last' baseline", None)
    melt0 = convert_ouro_to_melt(s.teacher, out / "melt-converted", MeltSettings(chunk_size=s.chunk_size))
    last = convert_ouro_to_melt(s.teacher, out / "melt-last", MeltSettings(policy="last", chunk_size=s.chunk_size))
    lap("convert")

    def train(
        student: Path, phase: int, steps: int, name: str, teacher: str = s.teacher, data: Path = TRAIN_TEXT
    ) -> Path:
        if data == TRAIN_TEXT:  # text: batches of seq_len-token sequences
            shape = dict(seq_len=s.seq_len, batch_tokens=s.batch_tokens, micro_batch=s.batch_tokens // s.seq_len)
        else:  # problems: one row each, as long as a problem
            shape = dict(micro_batch=s.reasoning_batch, **REASONING_LR)
        targs = TrainingArgs(out=out / name, steps=steps, seed=0, **shape)
        return run_phase(
            student,
            teacher,
            DistillSettings(phase=phase),
            DataArgs(data),
            targs,
            on_step=on_step,
            on_event=on_event,
        ).out

    stage(f"2/{total} phase 1: interpolated transition, {plural(s.steps1, 'step')}", s.steps1)
    phase1 = train(melt0, 1, s.steps1, "phase1")
    lap("phase 1")
    stage(f"3/{total} phase 2: attention-aligned distillation, {plural(s.steps2, 'step')}", s.steps2)
    melt = train(phase1, 2, s.steps2, "phase2")
    lap("phase 2")

    stage(f"4/{total} evaluate: held-out loss of the teacher, MELT and 'last'", None)
    models = {"Ouro teacher": s.teacher, "MELT (phase 1 + 2)": melt, "training-free last": last}
    for i, (name, path) in enumerate(models.items()):
        teacher = None if name == "Ouro teacher" else s.teacher
        settings = EvalSettings(seq_len=s.seq_len, max_sequences=s.eval_sequences)
        result = evaluate_checkpoint(
            path,
            VALID_TEXT,
            settings,
            teacher=teacher,
            progress=lambda done, total, i=i, name=name: progress(
                i * total + done, len(models) * total, "sequences", name
            ),
        )
        report.evaluation[name] = next(iter(result.results.values()))
    lap("evaluate")

    stage(f"5/{total} generate (temperature 0.8, top-k 40, seed 0)", None)
    tokenizer = load_tokenizer(s.teacher)
    generation = GenerationSettings(
        max_new_tokens=s.new_tokens, sampling=SamplingSettings(temperature=0.8, top_k=40, seed=0)
    )
    for i, (name, path) in enumerate(models.items()):
        progress(i, len(models), "samples", name)
        result = generate_text(load_model(path, dtype="fp32"), tokenizer, [s.prompt], generation).results[0]
        report.samples[name] = s.prompt + result.text
    progress(len(models), len(models), "samples", "")
    lap("generate")

    stage(f"6/{total} KV-cache memory per loop count", None)
    ouro_config, melt_config = load_config(s.teacher), load_config(melt)
    bf16 = torch.bfloat16
    for loops in s.kv_loops:
        report.kv_bytes[loops] = {
            "ouro": ouro_config.kv_bytes_per_token(bf16, loops),
            "melt": melt_config.kv_bytes_per_token(bf16, loops),
        }
        report.measured_cache_bytes[loops] = {  # the caches generation allocates, for kv_tokens tokens
            "ouro": KVCache(ouro_config, 1, s.kv_tokens, loops, dtype=bf16).nbytes(),
            "melt": KVCache(melt_config, 1, s.kv_tokens, loops, dtype=bf16).nbytes(),
        }
    lap("memory")
    if s.reasoning:
        run_reasoning(s, out / "reasoning", report, stage, train, progress)
        lap("reasoning")
    return report


def run_reasoning(s: QuickstartSettings, out: Path, report: QuickstartReport, stage, train, progress=None) -> None:
    """The recipe on the ``reasoning`` LoopLM: MELT after both phases and the training-free ``mean``
    and ``last``, against the teacher, by greedy-answer accuracy on held-out multi-hop problems."""
    progress = progress or (lambda done, total, unit, model: None)
    stage(f"7/7 reasoning: {s.reasoning_teacher} -> MELT, 'mean', 'last'; accuracy on multi-hop problems", None)
    out.mkdir()
    task = ChainTask()  # the reasoning model's task
    train_data, test_data = out / "train.jsonl", out / "test.jsonl"
    steps = s.reasoning_steps1 + s.reasoning_steps2
    trained = make_problems(task, TRAINED_HOPS, s.reasoning_batch * steps, seed=1)
    write_problems(trained, train_data)
    held_out = s.reasoning_problems * len(REASONING_HOPS)
    write_problems(make_problems(task, REASONING_HOPS, held_out, seed=2, exclude=trained), test_data)  # none trained on
    chunked = MeltSettings(chunk_size=s.reasoning_chunk_size)
    melt0 = convert_ouro_to_melt(s.reasoning_teacher, out / "melt-converted", chunked)
    free = {  # the training-free policies a trained MELT must beat to be worth its training
        policy: convert_ouro_to_melt(
            s.reasoning_teacher, out / f"melt-{policy}", MeltSettings(policy=policy, chunk_size=s.reasoning_chunk_size)
        )
        for policy in ("mean", "last")
    }
    stage(f"7/7 reasoning, phase 1: {plural(s.reasoning_steps1, 'step')}", s.reasoning_steps1)
    phase1 = train(melt0, 1, s.reasoning_steps1, f"{out.name}/phase1", s.reasoning_teacher, train_data)
    stage(f"7/7 reasoning, phase 2: {plural(s.reasoning_steps2, 'step')}", s.reasoning_steps2)
    melt = train(phase1, 2, s.reasoning_steps2, f"{out.name}/phase2", s.reasoning_teacher, train_data)
    bf16 = torch.bfloat16
    models = {"Ouro teacher": s.reasoning_teacher, "MELT (phase 1 + 2)": melt}
    models |= {f"training-free {policy}": path for policy, path in free.items()}
    stage("7/7 reasoning, evaluate: greedy-answer accuracy on held-out problems", None)
    for i, (name, path) in enumerate(models.items()):
        scores = evaluate_problems(
            path,
            test_data,
            progress=lambda done, total, i=i, name=name: progress(
                i * total + done, len(models) * total, "problems", name
            ),
        )
        final = next(iter(scores.results.values()))[-1]
        report.reasoning[name] = {
            "accuracy": final.accuracy,
            "by_hops": final.accuracy_by_hops,
            "kv_bytes_per_token": load_config(path).kv_bytes_per_token(bf16),
        }
