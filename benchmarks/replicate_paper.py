"""Replicate the MELT paper's claims at small scale on melt's example LoopLM.

Trains and evaluates, on held-out text (valid.jsonl.gz) and out-of-domain text (moby_dick.jsonl.gz):
  teacher          the Ouro-format LoopLM itself (per-loop KV cache)
  last/mean/ema    training-free shared-KV policies (converted, no training)
  phase 1          MELT (element-wise gate) after the interpolated transition
  phase 2          MELT after phase 1 + attention-aligned distillation (the full recipe)
  phase 2, beta 0  phase 1 + phase 2 without the attention alignment
  final-loop KD    phase 1 + phase 2 distilling the last loop only (melt's default is all loops)
  direct phase 2   phase 2 straight from the conversion (no transition)
  scalar gate      the full recipe with one gate value per layer and token
(last loop, and per loop on held-out text), and the loss vs loop count (1..8) of the teacher and of
MELT after phase 2.
Writes OUT/results.json, OUT/loss_vs_loops.png and prints a Markdown table.

Usage: python benchmarks/replicate_paper.py [--teacher example] [--steps1 60 --steps2 60] [--out runs/replicate]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from melt_core.checkpoints.convert import convert_ouro_to_melt
from melt_core.evaluation import EvalSettings, evaluate_checkpoint
from melt_core.models.config import MeltSettings
from melt_core.training.distill import DataArgs, DistillSettings, run_phase
from melt_core.training.trainer import TrainingArgs

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="example")
    p.add_argument("--train", type=Path, default=DATA / "train.jsonl.gz")
    p.add_argument("--valid", type=Path, default=DATA / "valid.jsonl.gz")
    p.add_argument("--ood", type=Path, default=DATA / "moby_dick.jsonl.gz")
    p.add_argument("--out", type=Path, default=Path("runs/replicate"))
    p.add_argument("--steps1", type=int, default=60)
    p.add_argument("--steps2", type=int, default=60)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--batch-tokens", type=int, default=1024)
    p.add_argument("--eval-sequences", type=int, default=32)
    p.add_argument("--max-loops", type=int, default=8)
    args = p.parse_args()
    if not args.train.is_file():
        raise SystemExit(f"{args.train} not found: this experiment needs the project's shared/data folder")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    def convert(name: str, policy: str) -> Path:
        return convert_ouro_to_melt(
            args.teacher, out / name, MeltSettings(policy=policy, chunk_size=args.chunk_size), force=True
        )

    def phase(student: Path, name: str, number: int, steps: int, **settings) -> Path:
        targs = TrainingArgs(
            out=out / name,
            steps=steps,
            seq_len=args.seq_len,
            batch_tokens=args.batch_tokens,
            micro_batch=args.batch_tokens // args.seq_len,
            force=True,
            seed=0,
        )
        t0 = time.time()
        run_phase(student, args.teacher, DistillSettings(phase=number, **settings), DataArgs(args.train), targs)
        print(f"  trained {name}: {steps} steps in {time.time() - t0:.0f} s", flush=True)
        return out / name

    print("converting and training ...", flush=True)
    models: dict[str, str | Path] = {"teacher (Ouro, per-loop KV)": args.teacher}
    for policy in ("last", "mean", "ema"):
        models[f"training-free {policy}"] = convert(f"free-{policy}", policy)
    gate = convert("gate", "gate")
    p1 = phase(gate, "gate-phase1", 1, args.steps1)
    models["MELT phase 1"] = p1
    models["MELT phase 1 + phase 2 (full)"] = phase(p1, "gate-phase2", 2, args.steps2)
    models["MELT phase 1 + phase 2, beta 0"] = phase(p1, "gate-phase2-beta0", 2, args.steps2, beta=0.0)
    models["MELT phase 1 + phase 2, final-loop KD"] = phase(p1, "gate-phase2-kdfinal", 2, args.steps2, kd_loops="final")
    models["MELT direct phase 2 (no transition)"] = phase(gate, "gate-direct-phase2", 2, args.steps1 + args.steps2)
    scalar = convert("scalar", "scalar")
    models["scalar gate, phase 1 + phase 2"] = phase(
        phase(scalar, "scalar-phase1", 1, args.steps1), "scalar-phase2", 2, args.steps2
    )

    print("evaluating ...", flush=True)
    eval_settings = EvalSettings(seq_len=args.seq_len, max_sequences=args.eval_sequences)
    results: dict = {"models": {}, "loops": {}}
    for name, path in models.items():
        row = {}
        for split, data in (("valid", args.valid), ("ood", args.ood)):
            report = evaluate_checkpoint(path, data, eval_settings, teacher=args.teacher)
            per_loop = [
                {"loss": r.loss, "ppl": r.perplexity, "kl": r.kl_to_teacher, "top1": r.top1_agreement}
                for r in next(iter(report.results.values()))
            ]
            row[split] = dict(per_loop[-1], per_loop=per_loop)
        results["models"][name] = row
        print(f"  {name}: valid {row['valid']['loss']:.4f}, ood {row['ood']['loss']:.4f}", flush=True)
    loop_counts = list(range(1, args.max_loops + 1))
    for name in ("teacher (Ouro, per-loop KV)", "MELT phase 1 + phase 2 (full)"):
        report = evaluate_checkpoint(models[name], args.valid, eval_settings, loops=loop_counts)
        results["loops"][name] = {n: r[-1].loss for n, r in report.results.items()}

    results["setup"] = {
        "teacher": str(args.teacher),
        "steps_phase1": args.steps1,
        "steps_phase2": args.steps2,
        "direct_phase2_steps": args.steps1 + args.steps2,
        "seq_len": args.seq_len,
        "chunk_size": args.chunk_size,
        "batch_tokens": args.batch_tokens,
        "eval_sequences": args.eval_sequences,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "minutes": round((time.time() - started) / 60, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print_markdown(results)
    plot(results, out / "loss_vs_loops.png")


def print_markdown(results: dict) -> None:
    print("\n| model | valid loss | valid ppl | valid KL | valid top-1 | OOD loss | OOD ppl | OOD KL | OOD top-1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, row in results["models"].items():
        v, o = row["valid"], row["ood"]
        print(
            f"| {name} | {v['loss']:.4f} | {v['ppl']:.2f} | {v['kl']:.4f} | {v['top1']:.1%} "
            f"| {o['loss']:.4f} | {o['ppl']:.2f} | {o['kl']:.4f} | {o['top1']:.1%} |"
        )
    loops = len(next(iter(results["models"].values()))["valid"]["per_loop"])
    print(
        "\n| model (valid, loss / KL per loop) | " + " | ".join(f"loop {t + 1}" for t in range(loops)) + " | mean KL |"
    )
    print("|---|" + "---|" * (loops + 1))
    for name, row in results["models"].items():
        per_loop = row["valid"]["per_loop"]
        cells = [f"{r['loss']:.4f} / {r['kl'] or 0:.4f}" for r in per_loop]
        print(f"| {name} | " + " | ".join(cells) + f" | {sum(r['kl'] or 0 for r in per_loop) / loops:.4f} |")
    print("\n| loops | " + " | ".join(results["loops"]) + " |")
    print("|---|" + "---|" * len(results["loops"]))
    counts = next(iter(results["loops"].values())).keys()
    for n in counts:
        print(f"| {n} | " + " | ".join(f"{results['loops'][m][n]:.4f}" for m in results["loops"]) + " |")


def plot(results: dict, file: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, losses in results["loops"].items():
        ax.plot(list(losses), list(losses.values()), marker="o", label=name)
    ax.set_xlabel("loops at inference")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("Loss vs loop count (valid.jsonl.gz)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    print(f"plot: {file}")


if __name__ == "__main__":
    main()
