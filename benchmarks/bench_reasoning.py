"""The MELT paper's ablations, measured in accuracy on melt's multi-hop reasoning task.

From the Ouro teacher (default: the built-in ``reasoning`` LoopLM), in one run:
- the teacher itself, and a plain model (T = 1, same layers = the same KV memory as MELT) when
  ``--plain DIR`` names one (train it with the teacher's recipe and ``--loops 1``, docs/reasoning.md);
- training-free conversions: ``last``, ``mean``, ``ema``;
- MELT after phase 1 and after phase 1 + 2 (the full recipe), for every ``--seeds`` value;
- ablations (first seed): ``scalar`` gate; no attention alignment (beta 0); no interpolated
  transition (phase 2 only, for as many steps as both phases); no chunk-wise training (trained with
  the whole row as one chunk, evaluated as it decodes: prefill chunks of the model's size, and
  token by token); a chunk-size sweep (trained and evaluated at each size);
- accuracy vs loops at inference, 1..2T, for the teacher and MELT.

Accuracy is greedy exact match on held-out problems (``melt_core.evaluation.problems``: prefill as
``melt generate`` does, then decode), per hop count, including hop counts beyond the training
range. Every row has its KV-cache bytes per token (bf16) next to it. Usage:

  python benchmarks/bench_reasoning.py --out runs/bench-reasoning --seeds 0,1 [--plain runs/plain]
  python benchmarks/bench_reasoning.py --out runs/smoke --quick          (minutes: a smoke run)

Writes ``results.json`` into ``--out`` and prints the tables (docs/reasoning.md shows a run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from melt_core import load_config
from melt_core.checkpoints import convert_ouro_to_melt
from melt_core.evaluation import evaluate_problems
from melt_core.models import MeltSettings
from melt_core.quickstart import REASONING_LR
from melt_core.tasks import ChainTask, make_problems, write_problems
from melt_core.tasks.chains import TRAINED_HOPS
from melt_core.training import DataArgs, DistillSettings, TrainingArgs, run_phase

TEST_HOPS = (1, 2, 3, 4, 5, 6, 7)  # the trained 1..5 and beyond


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="reasoning")
    p.add_argument("--plain", default=None, help="a plain (T = 1) model trained like the teacher")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps1", type=int, default=150)
    p.add_argument("--steps2", type=int, default=100)
    p.add_argument("--batch", type=int, default=64, help="problems per optimizer step")
    p.add_argument("--chunk-size", type=int, default=4)
    p.add_argument("--sweep", default="1,2,8", help="other chunk sizes to train and evaluate at")
    p.add_argument("--per-hops", type=int, default=200, help="held-out problems per hop count")
    p.add_argument("--quick", action="store_true", help="a smoke run: 4 + 3 steps, 20 problems per hop count")
    return p.parse_args()


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.out = args, args.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.teacher = args.teacher
        self.loops = load_config(self.teacher).total_ut_steps
        task = ChainTask()
        self.train_data = self.out / "train.jsonl"
        write_problems(make_problems(task, TRAINED_HOPS, 64 * 400, seed=101), self.train_data)
        self.test_data = self.out / "test.jsonl"
        write_problems(make_problems(task, TEST_HOPS, args.per_hops * len(TEST_HOPS), seed=202), self.test_data)
        self.rows: list[dict] = []
        self.curves: dict[str, list[float]] = {}
        self.started = time.perf_counter()

    # --- making models ---------------------------------------------------------------------------
    def convert(self, name: str, policy: str = "gate", chunk: int | None = None) -> Path:
        settings = MeltSettings(policy=policy, chunk_size=chunk or self.args.chunk_size)
        return convert_ouro_to_melt(self.teacher, self.out / name, settings, force=True)

    def phase(self, student: Path, name: str, phase: int, steps: int, seed: int, **distill) -> Path:
        args = TrainingArgs(
            out=self.out / name,
            steps=steps,
            seq_len=256,  # problem rows are as long as a problem; this only bounds them
            micro_batch=self.args.batch,
            **REASONING_LR,
            seed=seed,
            force=True,
        )
        t0 = time.perf_counter()
        run_phase(student, self.teacher, DistillSettings(phase=phase, **distill), DataArgs(self.train_data), args)
        print(f"  trained {name} (phase {phase}, {steps} steps) in {time.perf_counter() - t0:.0f} s", flush=True)
        return self.out / name

    def recipe(
        self,
        tag: str,
        seed: int,
        policy: str = "gate",
        chunk: int | None = None,
        train_chunk: int | None = None,
        beta: float = 0.1,
    ) -> tuple[Path, Path]:
        """convert -> phase 1 -> phase 2; returns (after phase 1, after phase 2). ``chunk``: the
        model's chunk size; ``train_chunk``: train at another one (the no-chunking ablation)."""
        s1, s2 = self.args.steps1, self.args.steps2
        start = self.convert(f"{tag}-converted", policy, chunk)
        p1 = self.phase(start, f"{tag}-phase1", 1, s1, seed, chunk_size=train_chunk)
        p2 = self.phase(p1, f"{tag}-phase2", 2, s2, seed, chunk_size=train_chunk, beta=beta)
        return p1, p2

    # --- measuring -------------------------------------------------------------------------------
    def evaluate(self, name: str, path: str | Path, group: str, seed: int | None = None, **kwargs) -> dict:
        report = evaluate_problems(path, self.test_data, **kwargs)
        count, per_loop = next(iter(report.results.items()))
        final = per_loop[-1]
        config = load_config(path)
        row = {
            "name": name,
            "group": group,
            "seed": seed,
            "loops": count,
            "accuracy": final.accuracy,
            "by_hops": final.accuracy_by_hops,
            "kv_bytes_per_token_bf16": config.kv_bytes_per_token(torch.bfloat16, count),
            **({"eval_chunk": kwargs["chunk_size"]} if "chunk_size" in kwargs else {}),
        }
        self.rows.append(row)
        hops = " ".join(f"{k}:{v:.0%}" for k, v in final.accuracy_by_hops.items())
        print(
            f"{name:<44} acc {final.accuracy:6.1%}  [{hops}]  KV {row['kv_bytes_per_token_bf16']} B/token", flush=True
        )
        return row

    def curve(self, name: str, path: str | Path) -> None:
        """Accuracy at 1..2T loops (each a full run at that loop count)."""
        loops = list(range(1, 2 * self.loops + 1))
        report = evaluate_problems(path, self.test_data, loops=loops)
        self.curves[name] = [report.results[n][-1].accuracy for n in loops]
        print(
            f"{name:<44} accuracy at loops 1..{2 * self.loops}: " + " ".join(f"{a:.0%}" for a in self.curves[name]),
            flush=True,
        )

    def write(self) -> None:
        summary = {
            "teacher": str(self.teacher),
            "loops": self.loops,
            "args": {k: str(v) for k, v in vars(self.args).items()},
            "test_hops": list(TEST_HOPS),
            "train_hops": list(TRAINED_HOPS),
            "seconds": time.perf_counter() - self.started,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "rows": self.rows,
            "curves": self.curves,
            "headline": headline(self.rows),
        }
        (self.out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")


def headline(rows: list[dict]) -> dict[str, dict]:
    """Mean and spread (min..max) over seeds of every row measured with more than one seed."""
    by_name: dict[str, list[float]] = {}
    for r in rows:
        if r["seed"] is not None:
            by_name.setdefault(r["name"], []).append(r["accuracy"])
    return {
        name: {"mean": statistics.mean(v), "min": min(v), "max": max(v), "seeds": len(v)}
        for name, v in by_name.items()
        if len(v) > 1
    }


def main() -> None:
    args = parse()
    if args.quick:
        args.steps1, args.steps2, args.per_hops, args.sweep = 4, 3, 20, "2"
    bench = Bench(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    sweep = [int(c) for c in args.sweep.split(",") if c]
    c = args.chunk_size
    print(f"teacher {args.teacher}: {bench.loops} loops; held-out: {args.per_hops} problems per hop count {TEST_HOPS}")

    bench.evaluate("Ouro teacher", args.teacher, "teacher")
    for policy in ("last", "mean", "ema"):
        bench.evaluate(f"training-free {policy}", bench.convert(f"free-{policy}", policy), "training-free")

    for seed in seeds:
        p1, p2 = bench.recipe(f"melt-s{seed}", seed)
        bench.evaluate("MELT phase 1", p1, "recipe", seed)
        bench.evaluate("MELT phase 1 + 2 (full recipe)", p2, "recipe", seed)
        if seed == seeds[0]:
            bench.evaluate("MELT full recipe, prefill token by token", p2, "recipe", seed, chunk_size=1)
            full = p2
    first = seeds[0]
    _, scalar = bench.recipe("scalar", first, policy="scalar")
    bench.evaluate("scalar gate (phase 1 + 2)", scalar, "ablation", first)
    _, no_align = bench.recipe("beta0", first, beta=0.0)
    bench.evaluate("no attention alignment (beta 0)", no_align, "ablation", first)
    start = bench.convert("no-transition-converted")
    no_transition = bench.phase(start, "no-transition-phase2", 2, args.steps1 + args.steps2, first)
    bench.evaluate("no interpolated transition (phase 2 only)", no_transition, "ablation", first)
    _, no_chunk = bench.recipe("no-chunk", first, train_chunk=256)
    bench.evaluate(f"no chunk-wise training, prefill chunks of {c}", no_chunk, "ablation", first)
    bench.evaluate("no chunk-wise training, prefill token by token", no_chunk, "ablation", first, chunk_size=1)
    for size in sweep:
        _, swept = bench.recipe(f"chunk{size}", first, chunk=size)
        bench.evaluate(f"chunk size {size} (trained and evaluated)", swept, "chunk sweep", first)

    if args.plain:  # last: it may be trained while the rows above run
        bench.evaluate("plain model (T = 1, same layers)", args.plain, "plain")
    bench.curve("Ouro teacher", args.teacher)
    bench.curve("MELT full recipe", full)
    bench.write()
    print(f"done in {time.perf_counter() - bench.started:.0f} s; {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
