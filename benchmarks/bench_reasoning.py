"""The MELT paper's recipe and ablations, measured in accuracy on melt's multi-hop reasoning task,
over training seeds and held-out problems, with bootstrap intervals.

From the Ouro teacher (default: the built-in ``reasoning`` LoopLM), in one run:
- training-free rows: the teacher itself; the ``last``, ``mean`` and ``ema`` conversions; a plain
  model (T = 1, same layers = the same KV memory as MELT) when ``--plain DIR`` names one;
- trained recipes, each trained once per ``--seeds`` value (at least 3): MELT after phase 1; after
  phase 1 + 2 (the full recipe); the ``scalar`` gate (phase 1 + 2); no attention alignment (phase 2
  with beta 0 from the full recipe's phase-1 checkpoint of the same seed); no interpolated
  transition (phase 2 alone, for steps1 + steps2 steps from the conversion);
- opt-in: ``--sweep 1,2,8`` (chunk sizes, trained and evaluated at each), ``--no-chunk`` (trained
  with the whole row as one chunk; evaluated in prefill chunks of the model's size and token by
  token), ``--curves`` (accuracy at 1..2T loops, teacher and the first seed's full recipe).

Accuracy is greedy exact match (prefill as ``melt generate`` does, then decode: the scoring of
``melt_core.evaluation.problems``, kept per problem here) on every ``--test-seeds`` file of held-out
problems, drawn so that none is a problem the students or the built-in teacher trained on (by
``canonical_form``). A recipe's accuracy is the mean over its seeds, test files and problems; its 95 %
interval and every comparison's (a paired bootstrap over seeds and problems) come from
``melt_core.evaluation.stats``. Usage:

  python benchmarks/bench_reasoning.py --out runs/bench-reasoning            (the full run)
  python benchmarks/bench_reasoning.py --out runs/smoke --quick              (minutes: a smoke run)

Writes ``results.json`` and ``report.md`` into ``--out`` and prints the report.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from melt_core import load_config
from melt_core.checkpoints import convert_ouro_to_melt, load_model, load_tokenizer
from melt_core.data import encode_problem, read_problems
from melt_core.evaluation import evaluate_problems
from melt_core.evaluation.problems import DEFAULT_BATCH, answer_scores
from melt_core.evaluation.stats import Interval, bootstrap_mean_interval, mean_of, paired_bootstrap_difference
from melt_core.models import MeltSettings
from melt_core.quickstart import REASONING_LR
from melt_core.runtime import resolve_device, set_threads
from melt_core.tasks import ChainTask, make_problems, write_problems
from melt_core.tasks.chains import TRAINED_HOPS, teacher_training_problems
from melt_core.training import DataArgs, DistillSettings, TrainingArgs, run_phase

TEST_HOPS = tuple(TRAINED_HOPS)  # every depth the task has
TRAIN_PROBLEMS, TRAIN_SEED = 64 * 400, 101

# Rows, by key: (name in the report, group)
TEACHER, FULL, PHASE1 = "teacher", "melt", "melt-phase1"
NAMES = {
    TEACHER: "Ouro teacher",
    "plain": "plain model (T = 1, same layers)",
    "free-last": "training-free last",
    "free-mean": "training-free mean",
    "free-ema": "training-free ema",
    PHASE1: "MELT phase 1",
    FULL: "MELT phase 1 + 2 (full recipe)",
    "scalar": "scalar gate (phase 1 + 2)",
    "beta0": "no attention alignment (beta 0)",
    "no-transition": "no interpolated transition (phase 2 only)",
}
# (claim, MELT arm, other arm); the paper's direction: the MELT arm is better, except vs the teacher
# (MELT recovers it: the difference should be within noise).
CLAIMS = [
    ("full recipe recovers the Ouro teacher", FULL, TEACHER),
    ("gate > scalar gate", FULL, "scalar"),
    ("gate > training-free mean", FULL, "free-mean"),
    ("gate > training-free ema", FULL, "free-ema"),
    ("gate > training-free last", FULL, "free-last"),
    ("attention alignment helps (full > beta 0)", FULL, "beta0"),
    ("interpolated transition helps (full > phase 2 only)", FULL, "no-transition"),
    ("phase 2 helps (full > phase 1)", FULL, PHASE1),
]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="reasoning")
    p.add_argument("--plain", default=None, help="a plain (T = 1) model trained like the teacher")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", default=None, help="training seeds, at least 3 (default 0,1,2; --quick: 0,1)")
    p.add_argument("--test-seeds", default="9001,9002", help="seeds of the held-out files")
    p.add_argument("--steps1", type=int, default=150)
    p.add_argument("--steps2", type=int, default=100)
    p.add_argument("--batch", type=int, default=64, help="problems per optimizer step")
    p.add_argument("--chunk-size", type=int, default=4)
    p.add_argument("--sweep", default="", help="opt-in: other chunk sizes to train and evaluate at, e.g. 1,2,8")
    p.add_argument("--no-chunk", action="store_true", help="opt-in: the no-chunk-wise-training ablation")
    p.add_argument("--curves", action="store_true", help="accuracy at 1..2T loops (teacher, first seed's MELT)")
    p.add_argument("--per-hops", type=int, default=200, help="held-out problems per hop count, per test file")
    p.add_argument("--replicates", type=int, default=4000, help="bootstrap replicates")
    p.add_argument("--bootstrap-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="a smoke run: 4 + 3 steps, 20 problems per hop count")
    args = p.parse_args()
    if args.quick:
        args.steps1, args.steps2, args.per_hops = 4, 3, 20
    args.seed_list = [int(s) for s in (args.seeds or ("0,1" if args.quick else "0,1,2")).split(",") if s]
    args.test_seed_list = [int(s) for s in args.test_seeds.split(",") if s]
    args.sweep_list = [int(c) for c in args.sweep.split(",") if c]
    if len(set(args.seed_list)) != len(args.seed_list) or len(args.seed_list) < (2 if args.quick else 3):
        p.error(f"--seeds needs at least {2 if args.quick else 3} distinct seeds, got {args.seed_list}")
    if len(set(args.test_seed_list)) != len(args.test_seed_list) or len(args.test_seed_list) < 2:
        p.error(f"--test-seeds needs at least 2 distinct seeds, got {args.test_seed_list}")
    if args.replicates < 2000:
        p.error("--replicates must be >= 2000")
    return args


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def score(model, tokenizer, data: Path, chunk_size: int | None = None, loops: int | None = None) -> list[int]:
    """Per problem of ``data`` (file order): 1 when greedy decoding at the model's final loop writes
    the answer. The scoring of ``evaluate_problems`` (same batches, same ``answer_scores``), kept
    per problem: ``evaluate_problems`` reports only the accuracies."""
    pairs = [encode_problem(tokenizer, p.prompt, p.answer) for p in read_problems(data)]
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]))
    n = model.config.resolve_loops(loops)
    solved = [0] * len(pairs)
    for first in range(0, len(order), DEFAULT_BATCH):
        rows = order[first : first + DEFAULT_BATCH]
        for i, (greedy, _) in zip(rows, answer_scores(model, [pairs[i] for i in rows], n, chunk_size), strict=True):
            solved[i] = int(greedy[-1])
    return solved


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.out = args, args.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.teacher = args.teacher
        self.loops = load_config(self.teacher).total_ut_steps
        task = ChainTask()
        self.train_data = self.out / "train.jsonl"
        trained = make_problems(task, TRAINED_HOPS, TRAIN_PROBLEMS, seed=TRAIN_SEED)
        write_problems(trained, self.train_data)
        # held-out problems: none that the teacher (the built-in model's) or the students trained on
        seen = trained + (teacher_training_problems() if args.teacher == "reasoning" else [])
        self.test_files: dict[int, Path] = {}
        self.test_hops: dict[int, list[int]] = {}
        for t in args.test_seed_list:
            problems = make_problems(task, TEST_HOPS, args.per_hops * len(TEST_HOPS), seed=t, exclude=seen)
            self.test_files[t] = self.out / f"test-{t}.jsonl"
            self.test_hops[t] = [p.hops for p in problems]
            write_problems(problems, self.test_files[t])
        self.rows: dict[str, dict] = {}  # key -> row, in the order measured
        self.curves: dict[str, list[float]] = {}
        self.phases: list[dict] = []  # every training phase and its seconds
        self.started = time.perf_counter()

    # --- making models ---------------------------------------------------------------------------
    def convert(self, name: str, policy: str = "gate", chunk: int | None = None) -> Path:
        if (self.out / name / "config.json").is_file():  # conversions are deterministic: one per name
            return self.out / name
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
        seconds = time.perf_counter() - t0
        self.phases.append({"name": name, "phase": phase, "steps": steps, "seed": seed, "seconds": seconds})
        print(f"  trained {name} (phase {phase}, {steps} steps) in {seconds:.0f} s", flush=True)
        return self.out / name

    # --- measuring -------------------------------------------------------------------------------
    def evaluate(self, key: str, path: str | Path, group: str, seed: int | None = None, **kwargs) -> None:
        """Score ``path`` on every test file; one (seed, test file) entry of row ``key``."""
        t0 = time.perf_counter()
        config = load_config(path)
        row = self.rows.setdefault(
            key,
            {
                "key": key,
                "name": NAMES.get(key, key),
                "group": group,
                "loops": config.total_ut_steps,
                "kv_bytes_per_token_bf16": config.kv_bytes_per_token(torch.bfloat16),
                "runs": [],
                **({"eval_chunk": kwargs["chunk_size"]} if "chunk_size" in kwargs else {}),
            },
        )
        model = load_model(path, dtype="auto", device=resolve_device("auto"))
        tokenizer = load_tokenizer(path)
        for t, data in self.test_files.items():
            correct = score(model, tokenizer, data, **kwargs)
            row["runs"].append(
                {
                    "seed": seed,
                    "test_seed": t,
                    "path": str(path),
                    "accuracy": sum(correct) / len(correct),
                    "by_hops": by_hops(correct, self.test_hops[t]),
                    "correct": correct,
                }
            )
        runs = row["runs"][-len(self.test_files) :]
        accs = " ".join(f"{r['accuracy']:.1%}" for r in runs)
        seed_text = "" if seed is None else f" seed {seed}"
        print(
            f"{row['name'] + seed_text:<52} acc {accs} (test files)  {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        self.write()  # partial results survive an interrupted run

    def check_scorer(self) -> None:
        """The per-problem scorer agrees with ``evaluate_problems`` (the teacher, first test file)."""
        first = next(iter(self.test_files.values()))
        report = evaluate_problems(self.teacher, first)
        expected = next(iter(report.results.values()))[-1].accuracy
        got = self.rows[TEACHER]["runs"][0]["accuracy"]
        if abs(got - expected) > 1e-12:
            raise SystemExit(f"per-problem scorer {got} != evaluate_problems {expected}")

    def curve(self, key: str, path: str | Path) -> None:
        """Accuracy at 1..2T loops (each a full run at that loop count), over all test files."""
        loops = list(range(1, 2 * self.loops + 1))
        accs = [0.0] * len(loops)
        for data in self.test_files.values():
            report = evaluate_problems(path, data, loops=loops)
            for j, n in enumerate(loops):
                accs[j] += report.results[n][-1].accuracy / len(self.test_files)
        self.curves[key] = accs
        print(f"{NAMES[key]:<52} accuracy at loops 1..{loops[-1]}: " + " ".join(f"{a:.0%}" for a in accs), flush=True)

    # --- statistics and output ---------------------------------------------------------------------
    def scores(self, key: str) -> list[list[list[int]]]:
        """[seed][test file][problem] of row ``key`` (seeds in measured order)."""
        runs = self.rows[key]["runs"]
        seeds = list(dict.fromkeys(r["seed"] for r in runs))
        by = {(r["seed"], r["test_seed"]): r["correct"] for r in runs}
        return [[by[s, t] for t in self.test_files] for s in seeds]

    def summarize(self) -> None:
        a = self.args
        for row in self.rows.values():
            scores = self.scores(row["key"])
            if len(scores) * len(self.test_files) != len(row["runs"]):
                continue  # an interrupted row
            ci = bootstrap_mean_interval(scores, replicates=a.replicates, seed=a.bootstrap_seed)
            row["seeds"] = list(dict.fromkeys(r["seed"] for r in row["runs"]))
            row["accuracy"] = {"mean": ci.estimate, "low": ci.low, "high": ci.high}
            hops = [self.test_hops[t] for t in self.test_files]
            row["by_hops"] = {
                str(k): mean_of(
                    [[[c for c, h in zip(f, hs, strict=True) if h == k] for f, hs in zip(s, hops)] for s in scores]
                )
                for k in TEST_HOPS
            }
        self.comparisons = []
        for claim, melt, other in CLAIMS:
            if "accuracy" not in self.rows.get(melt, {}) or "accuracy" not in self.rows.get(other, {}):
                continue
            d = paired_bootstrap_difference(
                self.scores(melt), self.scores(other), replicates=a.replicates, seed=a.bootstrap_seed
            )
            self.comparisons.append(
                {
                    "claim": claim,
                    "melt": melt,
                    "other": other,
                    "difference": d.estimate,
                    "low": d.low,
                    "high": d.high,
                    "verdict": verdict(d, other == TEACHER),
                }
            )

    def write(self, final: bool = False) -> None:
        if final:
            self.summarize()
        summary = {
            "teacher": str(self.teacher),
            "loops": self.loops,
            "args": {k: str(v) for k, v in vars(self.args).items()},
            "train_data": {"file": str(self.train_data), "problems": TRAIN_PROBLEMS, "seed": TRAIN_SEED},
            "test_files": {str(t): str(p) for t, p in self.test_files.items()},
            "test_hops": list(TEST_HOPS),
            "train_hops": list(TRAINED_HOPS),
            "seconds": time.perf_counter() - self.started,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "cpu": cpu_model(),
            "complete": final,
            "phases": self.phases,
            "rows": list(self.rows.values()),
            "comparisons": getattr(self, "comparisons", []) if final else [],
            "curves": self.curves,
        }
        (self.out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
        if final:
            text = report(summary)
            (self.out / "report.md").write_text(text)
            print(text)


def by_hops(correct: list[int], hops: list[int]) -> dict[str, float]:
    out = {}
    for k in sorted(set(hops)):
        solved = [c for c, h in zip(correct, hops, strict=True) if h == k]
        out[str(k)] = sum(solved) / len(solved)
    return out


def verdict(d: Interval, vs_teacher: bool) -> str:
    side = d.excludes_zero()
    if vs_teacher:
        return {1: "MELT above teacher", -1: "MELT below teacher", 0: "within noise"}[side]
    return {1: "holds", -1: "does not hold", 0: "within noise"}[side]


def points(x: float) -> str:
    return f"{100 * x:+.1f}"


def report(summary: dict) -> str:
    a = summary["args"]
    hops = summary["test_hops"]
    lines = [
        f"# MELT on the reasoning task: teacher {summary['teacher']} ({summary['loops']} loops)",
        "",
        f"Training: {a['steps1']} + {a['steps2']} steps, batch {a['batch']}, chunk size {a['chunk_size']}; "
        f"held-out: {len(summary['test_files'])} test files ({a['test_seeds']}) x {a['per_hops']} problems per "
        f"hop count. Accuracy: mean over seeds, test files and problems [95 % bootstrap interval over seeds "
        f"and problems, {a['replicates']} replicates]. {summary['seconds']:.0f} s on {summary['threads']} "
        f"threads, {summary['cpu']}, torch {summary['torch']}.",
        "",
        "| recipe | seeds | accuracy mean [95 % CI] | " + " | ".join(f"{k} hop" for k in hops) + " | KV B/token bf16 |",
        "|---|---|---|" + "---|" * len(hops) + "---|",
    ]
    for row in summary["rows"]:
        if "accuracy" not in row:
            continue
        acc = row["accuracy"]
        seeds = "-" if row["seeds"] == [None] else ",".join(str(s) for s in row["seeds"])
        lines.append(
            f"| {row['name']} | {seeds} | {100 * acc['mean']:.1f} [{100 * acc['low']:.1f}, {100 * acc['high']:.1f}] | "
            + " | ".join(f"{100 * row['by_hops'][str(k)]:.1f}" for k in hops)
            + f" | {row['kv_bytes_per_token_bf16']} |"
        )
    lines += [
        "",
        "Orderings (paired bootstrap over seeds and problems; difference in points, MELT arm minus the other):",
        "",
        "| claim | difference [95 % CI] | verdict |",
        "|---|---|---|",
    ]
    for c in summary["comparisons"]:
        lines.append(
            f"| {c['claim']} | {points(c['difference'])} [{points(c['low'])}, {points(c['high'])}] | {c['verdict']} |"
        )
    if summary["curves"]:
        lines += ["", "Accuracy at 1..2T loops (mean over test files):", ""]
        for key, accs in summary["curves"].items():
            lines.append(f"- {NAMES.get(key, key)}: " + " ".join(f"{100 * x:.0f}" for x in accs))
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse()
    set_threads(args.threads)
    bench = Bench(args)
    seeds, c = args.seed_list, args.chunk_size
    print(
        f"teacher {args.teacher}: {bench.loops} loops; seeds {seeds}; held-out: {len(bench.test_files)} files x "
        f"{args.per_hops} problems per hop count {TEST_HOPS}; {torch.get_num_threads()} threads",
        flush=True,
    )

    bench.evaluate(TEACHER, args.teacher, "teacher")
    bench.check_scorer()
    for policy in ("last", "mean", "ema"):
        bench.evaluate(f"free-{policy}", bench.convert(f"free-{policy}", policy), "training-free")
    if args.plain:
        bench.evaluate("plain", args.plain, "plain")

    s1, s2 = args.steps1, args.steps2
    for seed in seeds:
        gate, scalar = bench.convert("gate-converted"), bench.convert("scalar-converted", "scalar")
        p1 = bench.phase(gate, f"melt-s{seed}-phase1", 1, s1, seed)
        bench.evaluate(PHASE1, p1, "recipe", seed)
        full = bench.phase(p1, f"melt-s{seed}-phase2", 2, s2, seed, beta=0.1)
        bench.evaluate(FULL, full, "recipe", seed)
        beta0 = bench.phase(p1, f"beta0-s{seed}-phase2", 2, s2, seed, beta=0.0)
        bench.evaluate("beta0", beta0, "ablation", seed)
        sp1 = bench.phase(scalar, f"scalar-s{seed}-phase1", 1, s1, seed)
        bench.evaluate("scalar", bench.phase(sp1, f"scalar-s{seed}-phase2", 2, s2, seed, beta=0.1), "ablation", seed)
        no_transition = bench.phase(gate, f"no-transition-s{seed}-phase2", 2, s1 + s2, seed, beta=0.1)
        bench.evaluate("no-transition", no_transition, "ablation", seed)
        if args.no_chunk:
            n1 = bench.phase(gate, f"no-chunk-s{seed}-phase1", 1, s1, seed, chunk_size=256)
            n2 = bench.phase(n1, f"no-chunk-s{seed}-phase2", 2, s2, seed, beta=0.1, chunk_size=256)
            bench.evaluate(f"no chunk-wise training, prefill chunks of {c}", n2, "opt-in", seed)
            bench.evaluate("no chunk-wise training, prefill token by token", n2, "opt-in", seed, chunk_size=1)
        for size in args.sweep_list:
            start = bench.convert(f"chunk{size}-converted", chunk=size)
            w1 = bench.phase(start, f"chunk{size}-s{seed}-phase1", 1, s1, seed)
            w2 = bench.phase(w1, f"chunk{size}-s{seed}-phase2", 2, s2, seed, beta=0.1)
            bench.evaluate(f"chunk size {size} (trained and evaluated)", w2, "opt-in", seed)
        if args.curves and seed == seeds[0]:
            bench.curve(TEACHER, args.teacher)
            bench.curve(FULL, full)

    bench.write(final=True)
    print(f"done in {time.perf_counter() - bench.started:.0f} s; {args.out / 'results.json'}, {args.out / 'report.md'}")


if __name__ == "__main__":
    main()
