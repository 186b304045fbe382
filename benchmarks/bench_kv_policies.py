"""One scoreboard of KV-cache policies for a looped LM: quality, KV bytes per token and decode speed.

For a LoopLM (Ouro format) and the caches that can replace its per-(loop, layer) one, at T (the
model's loop count) and 2T loops:

  Ouro, full per-loop cache                   the teacher itself (fp32 rows, and int4 rows)
  shared last / first / mean / ema            MELT's one row per layer, training-free update rules
                                              (``last``: overwritten each loop, no gate; ``first``:
                                              the first loop's row; ``mean``; ``ema``)
  first-then-shared last / mean               the ``first_then_shared`` cache layout: loop 1's rows
                                              kept apart, later loops share one row per layer
  shared mean, int8 / int4 / int4 + window    the same rows quantised (+ the newest 64 positions fp32)
  trained gate / scalar / mean / ema / last   MELT's two phases (transition, then distillation) from
                                              the teacher, per update rule (the paper's ablations)
  trained gate, int4 + window

Quality: ``--text`` (a LoopLM on text): held-out next-token loss of every position, prefilled
through the cache in the model's chunks (later chunks attend to the rows earlier ones left, in the
cache's format); ``--problems`` (a reasoning LoopLM): greedy-answer accuracy as ``melt eval problems``
decodes. KV bytes per token: exact, for bf16 rows (int rows: with their fp16 scales; the residual
window is a fixed ring, not per token). Decode tok/s: teacher-forced decode steps after a 256-token
prefill, batch 1, on this machine. Training (``--steps1`` / ``--steps2`` > 0) uses ``--train``.

Usage:
  python benchmarks/bench_kv_policies.py --teacher example --text valid.jsonl.gz --train train.jsonl.gz
  python benchmarks/bench_kv_policies.py --teacher reasoning --problems test.jsonl --train train.jsonl \\
      --chunk-size 4 --micro-batch 64 --lr 3e-4 --gate-lr 3e-3
  --only NAME (repeatable; a substring of a row's name) runs those rows alone and merges them into
  an existing OUT/kv-policies.json (the other rows are kept as they were measured).
Writes OUT/kv-policies.json, OUT/kv-policies.png and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from melt_core import load_model, load_tokenizer
from melt_core.cache.quantized import kv_format
from melt_core.checkpoints.convert import convert_ouro_to_melt
from melt_core.data import PackedSequences
from melt_core.evaluation import evaluate_problems
from melt_core.inference.engine import Engine, EngineOptions
from melt_core.models import MeltSettings
from melt_core.profiling.measure import measure_generation
from melt_core.training.distill import DataArgs, DistillSettings, run_phase
from melt_core.training.trainer import TrainingArgs

FREE_RULES = ("last", "first", "mean", "ema")
FIRST_THEN_SHARED_RULES = ("last", "mean")
TRAINED_RULES = ("gate", "scalar", "mean", "ema", "last")
WINDOW = 64  # positions kept in full precision by "int4 + window"


@dataclass(frozen=True)
class Entry:
    name: str
    checkpoint: str  # path or built-in name
    kv: str  # a kv_format name
    residual: int = 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="example")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", type=Path, help="held-out text (.txt/.jsonl[.gz]): next-token loss")
    what.add_argument("--problems", type=Path, help="a problem file (melt data reasoning): accuracy")
    p.add_argument("--train", type=Path, help="training data of the trained rows (text or problems)")
    p.add_argument("--steps1", type=int, default=0, help="phase-1 steps of the trained rows (0: none trained)")
    p.add_argument("--steps2", type=int, default=0)
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256, help="text: tokens per sequence (training and scoring)")
    p.add_argument("--micro-batch", type=int, default=4, help="sequences (or problems) per step")
    p.add_argument("--lr", type=float, default=8e-6)
    p.add_argument("--gate-lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sequences", type=int, default=32, help="text: held-out sequences scored")
    p.add_argument("--limit", type=int, default=None, help="problems: the first N")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--out", type=Path, default=Path("runs/kv-policies"))
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--only", action="append", help="run the rows whose name contains this; merge into OUT's JSON")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if (args.steps1 or args.steps2) and args.train is None:
        p.error("--steps1/--steps2 train the rows on --train: give it")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    entries = [e for e in build_entries(args, out) if wanted(args, e.name)]
    teacher_loops = load_model(args.teacher).config.total_ut_steps
    loop_counts = [teacher_loops, 2 * teacher_loops]
    rows = []
    for entry in entries:
        t0 = time.time()
        row = {"name": entry.name, "kv": entry.kv, "residual": entry.residual, "by_loops": {}}
        model = load_model(entry.checkpoint, dtype="fp32")
        fmt = kv_format(entry.kv, None, entry.residual)
        for loops in loop_counts:
            cell = {"kv_bytes_per_token": kv_bytes_per_token(model, loops, fmt)}
            if args.text is not None:
                cell["loss"] = text_loss(model, entry.checkpoint, args, loops, fmt)
            else:
                report = evaluate_problems(
                    entry.checkpoint, args.problems, loops=[loops], limit=args.limit, dtype="fp32", kv_dtype=fmt
                )
                cell["accuracy"] = report.results[loops][-1].accuracy
                cell["answer_loss"] = report.results[loops][-1].loss
            run = measure_generation(
                model,
                loops=loops,
                seq_len=256 + args.decode_tokens,
                decode_tokens=args.decode_tokens,
                kv_dtype=fmt,
                track_memory=False,
            )
            cell["decode_tokens_per_s"] = run.decode_tokens_per_s
            row["by_loops"][str(loops)] = cell
        rows.append(row)
        print(f"  {entry.name}: {json.dumps(row['by_loops'])} ({time.time() - t0:.0f} s)", flush=True)
    setup = {
        **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}",
        "minutes": round((time.time() - started) / 60, 1),
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.only:  # the rows measured before, with these replaced or added; the earlier run's setup kept
        earlier = json.loads((out / "kv-policies.json").read_text())
        new = {row["name"] for row in rows}
        rows = [r for r in earlier["rows"] if r["name"] not in new] + rows
        setup = {**earlier["setup"], "added": [*earlier["setup"].get("added", []), {**setup, "rows": sorted(new)}]}
    results = {
        "teacher": args.teacher,
        "metric": "loss" if args.text is not None else "accuracy",
        "data": str(args.text or args.problems),
        "loops": loop_counts,
        "rows": rows,
        "setup": setup,
    }
    (out / "kv-policies.json").write_text(json.dumps(results, indent=2) + "\n")
    print_markdown(results)
    plot(results, out / "kv-policies.png")


def wanted(args: argparse.Namespace, name: str) -> bool:
    return not args.only or any(part in name for part in args.only)


def build_entries(args: argparse.Namespace, out: Path) -> list[Entry]:
    """The teacher, the training-free conversions, and (with steps) the trained rows, on disk."""

    def convert(rule: str, name: str, layout: str = "shared") -> str:
        settings = MeltSettings(policy=rule, layout=layout, chunk_size=args.chunk_size)
        return str(convert_ouro_to_melt(args.teacher, out / name, settings, force=True))

    entries = [
        Entry("Ouro, full per-loop cache", args.teacher, "auto"),
        Entry("Ouro, full per-loop cache, int4", args.teacher, "int4"),
    ]
    free = {rule: convert(rule, f"free-{rule}") for rule in FREE_RULES}
    entries += [Entry(f"shared {rule} (training-free)", path, "auto") for rule, path in free.items()]
    entries += [
        Entry("shared mean (training-free), int8", free["mean"], "int8"),
        Entry("shared mean (training-free), int4", free["mean"], "int4"),
        Entry(f"shared mean (training-free), int4 + {WINDOW} fp32", free["mean"], "int4", WINDOW),
    ]
    for rule in FIRST_THEN_SHARED_RULES:
        path = convert(rule, f"free-fts-{rule}", layout="first_then_shared")
        entries.append(Entry(f"first-then-shared {rule} (training-free)", path, "auto"))
    if not (args.steps1 or args.steps2):
        return entries
    for rule in TRAINED_RULES:
        if not any(wanted(args, name) for name in [f"{rule} (trained)"] + ["gate (trained), int4"] * (rule == "gate")):
            continue
        student = convert(rule, f"trained-{rule}")
        for phase, steps in ((1, args.steps1), (2, args.steps2)):
            if steps:
                student = str(train(args, out, student, phase, steps, f"trained-{rule}-phase{phase}"))
        entries.append(Entry(f"{'MELT ' if rule == 'gate' else ''}{rule} (trained)", student, "auto"))
        if rule == "gate":
            entries.append(Entry(f"MELT gate (trained), int4 + {WINDOW} fp32", student, "int4", WINDOW))
    return entries


def train(args: argparse.Namespace, out: Path, student: str, phase: int, steps: int, name: str) -> Path:
    t0 = time.time()
    problems = args.problems is not None
    shape = {} if problems else {"seq_len": args.seq_len}
    targs = TrainingArgs(
        out=out / name,
        steps=steps,
        seed=args.seed,
        micro_batch=args.micro_batch,
        lr=args.lr,
        gate_lr=args.gate_lr,
        force=True,
        **shape,
    )
    result = run_phase(student, args.teacher, DistillSettings(phase=phase), DataArgs(args.train), targs)
    print(f"  trained {name}: {steps} steps in {time.time() - t0:.0f} s", flush=True)
    return result.out


def kv_bytes_per_token(model: torch.nn.Module, loops: int, fmt) -> float:
    """Exact bytes per token of bf16 rows (int rows: their bytes with scales), residual ring excluded."""
    return float(sum(model.config.kv_bytes_per_loop(torch.bfloat16, loops, fmt)))


@torch.no_grad()
def text_loss(model: torch.nn.Module, checkpoint: str, args: argparse.Namespace, loops: int, fmt) -> float:
    """Mean next-token loss of every position, prefilled through the cache in the model's chunks."""
    data = PackedSequences.from_path(args.text, load_tokenizer(checkpoint), args.seq_len).sequences[: args.sequences]
    engine = Engine(model, EngineOptions(loops=loops, chunk_size=args.chunk_size, kv_dtype=fmt))
    total, count = 0.0, 0
    for ids in data:
        cache = engine.new_cache(1, ids.shape[0])
        logits = engine.prefill(cache, ids[None], all_positions=True)[0].float()
        total += F.cross_entropy(logits[:-1], ids[1:], reduction="sum").item()
        count += ids.shape[0] - 1
    return total / count


def print_markdown(results: dict) -> None:
    metric = results["metric"]
    loops = results["loops"]
    head = " | ".join(f"{metric} @ {n} loops | KV B/token @ {n}" for n in loops)
    print(f"\n| policy | {head} | decode tok/s @ {loops[0]} |")
    print("|---|" + "---|---|" * len(loops) + "---|")
    for row in results["rows"]:
        cells = []
        for n in loops:
            c = row["by_loops"][str(n)]
            value = f"{c['loss']:.4f}" if metric == "loss" else f"{c['accuracy']:.1%}"
            cells.append(f"{value} | {c['kv_bytes_per_token']:,.0f}")
        print(
            f"| {row['name']} | "
            + " | ".join(cells)
            + f" | {row['by_loops'][str(loops[0])]['decode_tokens_per_s']:.0f} |"
        )


def plot(results: dict, file: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    metric = results["metric"]
    fig, axes = plt.subplots(1, len(results["loops"]), figsize=(12, 5), sharey=True)
    for ax, n in zip(axes, results["loops"], strict=True):
        for i, row in enumerate(results["rows"]):
            c = row["by_loops"][str(n)]
            ax.scatter(c["kv_bytes_per_token"], c[metric], marker="os^vD<>pPX*h"[i % 12], s=40, label=row["name"])
        ax.set_xscale("log")
        ax.set_xlabel("KV bytes per token (log)")
        ax.set_title(f"{results['teacher']}, {n} loops")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out loss (nats/token)" if metric == "loss" else "greedy-answer accuracy")
    axes[-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    print(f"plot: {file}")


if __name__ == "__main__":
    main()
