"""Training throughput: phase-1 and phase-2 MELT steps vs the teacher's own forward+backward.

All three are measured in one run, on the same random Ouro model and the same batches:
  teacher   Ouro full-sequence forward + next-token CE (mean over loops) + backward
  phase 1   teacher forward (no_grad) + MELT chunk-wise forward at alpha = 0.5 (per-loop base rows
            kept) + all-loop KD + backward
  phase 2   teacher forward (no_grad, with attention taps) + MELT chunk-wise forward + KD +
            attention alignment + backward
Usage: python benchmarks/bench_training.py [--hidden 256 --layers 4 --seq-len 512 --chunk-size 128]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from melt_core.checkpoints.convert import convert_ouro_to_melt
from melt_core.checkpoints.io import load_config
from melt_core.checkpoints.random_model import write_random_ouro
from melt_core.models.config import MeltSettings
from melt_core.training.distill import DistillObjective, DistillSettings
from melt_core.training.losses import next_token_cross_entropy


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--loops", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        ouro = write_random_ouro(
            Path(tmp) / "ouro",
            hidden_size=args.hidden,
            intermediate_size=4 * args.hidden,
            num_hidden_layers=args.layers,
            num_attention_heads=args.hidden // 64,
            num_key_value_heads=args.hidden // 64,
            total_ut_steps=args.loops,
            vocab_size=2048,
        )
        melt = convert_ouro_to_melt(ouro, Path(tmp) / "melt", MeltSettings(chunk_size=args.chunk_size))
        vocab = load_config(ouro).vocab_size
        ids = torch.randint(3, vocab, (args.batch, args.seq_len))
        tokens = ids.numel()
        results = {}

        p1 = DistillObjective(melt, ouro, DistillSettings(phase=1), steps=3)
        teacher = p1.teacher
        teacher.requires_grad_(True)
        teacher.model.early_exit_gate.requires_grad_(False)

        def teacher_step() -> None:
            hidden, _ = teacher.forward_hidden(ids)
            loss = torch.stack([next_token_cross_entropy(h, teacher.lm_head.weight, ids) for h in hidden]).mean()
            loss.backward()
            teacher.zero_grad(set_to_none=True)

        results["teacher fwd+bwd"] = timed(teacher_step, args.repeats)
        teacher.requires_grad_(False)

        def phase_step(objective: DistillObjective) -> None:
            loss, _ = objective.loss(objective.model, ids, step=1)  # phase 1: alpha = 0.5 at step 1 of 3
            loss.backward()
            objective.student.zero_grad(set_to_none=True)

        results["phase 1 step"] = timed(lambda: phase_step(p1), args.repeats)
        p2 = DistillObjective(melt, ouro, DistillSettings(phase=2), steps=3)
        results["phase 2 step"] = timed(lambda: phase_step(p2), args.repeats)

    print(
        f"model: hidden {args.hidden}, {args.layers} layers, {args.loops} loops; batch {args.batch} x "
        f"{args.seq_len} tokens, MELT chunk {args.chunk_size}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    base = results["teacher fwd+bwd"]
    for name, seconds in results.items():
        print(
            f"{name:>16}: {tokens / seconds:10,.0f} tokens/s  ({seconds * 1000:8.1f} ms/step, "
            f"{base / seconds:.2f}x the teacher's speed)"
        )


if __name__ == "__main__":
    main()
