"""Throughput at a fixed memory budget: the largest batch Ouro and MELT each fit, and its tokens/s.

MELT's speed advantage is not per step (a MELT step reads as many rows as Ouro's and 12 % more
weight bytes) but that its cache is T x smaller, so T x more sequences fit in the same memory. For
a memory budget (weights + KV cache) and a context length L, each model's batch is the largest
whose exact cache (``config.kv_cache_bytes_per_loop``) fits next to its weights; both then decode
``--new-tokens`` steps after an L - new-tokens prompt, interleaved round by round (median of
``--rounds``). Default: the built-in example LoopLM and its MELT conversion (same weights), fp32.

Usage: python benchmarks/bench_budget_throughput.py [--budget-mib 96,160] [--context 512] [--loops 4]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from timing import decode_step_seconds

from melt_core import load_model
from melt_core.checkpoints import melt_from_ouro
from melt_core.models import MeltSettings


def weights_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def largest_batch(model, budget: int, context: int, loops: int, cap: int) -> int:
    """The most sequences of ``context`` positions whose cache fits in ``budget`` next to the weights."""
    per_sequence = sum(model.config.kv_cache_bytes_per_loop(model.dtype, loops, None, context, 1))
    return max(0, min(cap, (budget - weights_bytes(model)) // per_sequence))


def prompt(model, batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-mib", default="96,160", help="memory budgets (weights + KV cache), MiB")
    p.add_argument("--context", type=int, default=512, help="positions per sequence (prompt + new tokens)")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--loops", type=int, default=4)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    ouro = load_model("example", dtype="fp32")
    melt = melt_from_ouro(ouro, MeltSettings(chunk_size=32))
    models = {"Ouro": ouro, "MELT": melt}
    print(
        f"example LoopLM (fp32, {args.loops} loops), context {args.context} (prompt {args.context - args.new_tokens} "
        f"+ {args.new_tokens} decoded), median of {args.rounds} interleaved rounds; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; weights: Ouro {weights_bytes(ouro) / 2**20:.1f} MiB, "
        f"MELT {weights_bytes(melt) / 2**20:.1f} MiB"
    )
    print(f"{'budget':>9} {'model':5} {'batch':>5} {'KV cache':>10} {'decode tok/s':>12} {'MELT / Ouro':>11}")
    for budget_mib in (int(b) for b in args.budget_mib.split(",")):
        budget = budget_mib * 2**20
        batches = {
            name: largest_batch(m, budget, args.context, args.loops, args.max_batch) for name, m in models.items()
        }
        times: dict[str, list[float]] = {name: [] for name in models}
        for r in range(args.rounds):
            order = list(models) if r % 2 == 0 else list(models)[::-1]
            for name in order:
                if batches[name]:
                    ids = prompt(models[name], batches[name], args.context - args.new_tokens, r)
                    times[name].append(decode_step_seconds(models[name], ids, args.new_tokens, args.loops))
        speed = {name: batches[name] / statistics.median(times[name]) if times[name] else 0.0 for name in models}
        for name, model in models.items():
            kv = sum(model.config.kv_cache_bytes_per_loop(model.dtype, args.loops, None, args.context, batches[name]))
            ratio = f"{speed['MELT'] / speed['Ouro']:.2f}x" if name == "MELT" and speed["Ouro"] else ""
            print(
                f"{budget_mib:>5} MiB {name:5} {batches[name]:>5} {kv / 2**20:>6.1f} MiB "
                f"{speed[name]:>12.1f} {ratio:>11}"
            )


if __name__ == "__main__":
    main()
