"""Decode speed and memory of Ouro vs MELT for loops 1, 2, 4, 8, 16, measured in one run.

A random Ouro model (shapes chosen so that the KV cache, not the weights, dominates memory) and
its in-memory MELT conversion (shared weights) each prefill the same random context and decode a
few tokens, teacher-forced, through a cache sized for exactly that context, for every loop count.

What is measured (``melt_core.profiling.measure_generation``):
- decode tokens/s: one-token forward steps per second after the prefill;
- peak memory: the process's peak RSS (CUDA: allocator peak) during the run, weights included;
- memory: the baseline is taken right before the cache is allocated (weights loaded, process
  warmed up); the peak is the process RSS sampled every 0.5 ms (on CUDA: the allocator's peak)
  during cache allocation + prefill + decode; ``held`` is the memory still held after the last
  decode step, with the cache alive. Both are compared with the analytic KV bytes from the config
  (``kv_bytes_per_token x tokens``); the ratio is measured / analytic. The peak also holds the
  prefill's transient activations (bounded by the chunk size), so it sits a little above 1.

Run from the repository root:  python benchmarks/bench_generate_memory.py  (a few minutes on a
2-core CPU; ``--help`` for sizes). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

from melt_core.checkpoints.convert import melt_from_ouro
from melt_core.checkpoints.random_model import init_weights
from melt_core.models.config import OuroConfig
from melt_core.models.ouro import OuroForCausalLM
from melt_core.profiling import measure_generation


def build_ouro(layers: int, hidden: int, heads: int, head_dim: int, seq_len: int) -> OuroForCausalLM:
    """A random fp32 Ouro model with a wide KV (``heads * head_dim``) and a narrow MLP."""
    config = OuroConfig(
        vocab_size=512,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=head_dim,
        max_position_embeddings=max(seq_len, 2048),
        total_ut_steps=4,
        torch_dtype="float32",
    )
    model = OuroForCausalLM(config)
    init_weights(model, seed=0)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loops", default="1,2,4,8,16")
    parser.add_argument("--seq-len", type=int, default=1024, help="context: prefill + decoded tokens")
    parser.add_argument("--decode-tokens", type=int, default=8)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=64, help="prefill chunk (both models)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", action="store_true", help="also print every run as a JSON line")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loops = [int(t) for t in args.loops.split(",")]

    ouro = build_ouro(args.layers, args.hidden, args.heads, args.head_dim, args.seq_len)
    melt = melt_from_ouro(ouro)  # shares the Ouro tensors; adds the gates
    cfg = ouro.config
    params = sum(p.numel() for p in ouro.parameters())
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, {platform.system()}"
    )
    print(
        f"model: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_key_value_heads} kv heads x "
        f"{cfg.head_dim}, {params / 1e6:.1f}M params (+{sum(p.numel() for p in melt.gate_parameters()) / 1e6:.1f}M "
        f"gate params), fp32; context {args.seq_len} tokens ({args.seq_len - args.decode_tokens} prefilled in "
        f"chunks of {args.chunk_size}, {args.decode_tokens} decoded)"
    )
    print(
        f"KV bytes per token: Ouro {cfg.kv_bytes_per_token(torch.float32, 1):,} x loops, "
        f"MELT {melt.config.kv_bytes_per_token(torch.float32):,} at any loop count"
    )
    for model in (ouro, melt):  # warm-up: thread pools and first-call allocations out of the numbers
        measure_generation(model, loops=1, seq_len=64, decode_tokens=2, chunk_size=args.chunk_size)

    header = (
        f"{'model':<5} {'loops':>5} {'decode tok/s':>12} {'peak memory':>12} {'analytic KV':>12} "
        f"{'peak above base':>16} "
        f"{'peak/analytic':>13} {'held above base':>16} {'held/analytic':>13} "
        f"{'per-loop rows (decode step)':>30}"
    )
    print(header)
    print("-" * len(header))
    mib = 2**20
    for t in loops:
        for name, model in (("ouro", ouro), ("melt", melt)):
            run = measure_generation(
                model, loops=t, seq_len=args.seq_len, decode_tokens=args.decode_tokens, chunk_size=args.chunk_size
            )
            analytic = model.config.kv_bytes_per_token(torch.float32, t) * args.seq_len
            assert run.cache_bytes == analytic
            steps = {b - a for a, b in zip(run.in_use_bytes_after_loop, run.in_use_bytes_after_loop[1:])}
            per_loop = f"+{next(iter(steps)) / mib:.3f} MiB/loop" if len(steps) == 1 else "-"
            peak = run.baseline_bytes + run.peak_delta_bytes
            print(
                f"{name:<5} {t:>5} {run.decode_tokens_per_s:>12.2f} {peak / mib:>8.1f} MiB "
                f"{analytic / mib:>8.1f} MiB "
                f"{run.peak_delta_bytes / mib:>12.1f} MiB {run.peak_delta_bytes / analytic:>13.3f} "
                f"{run.held_delta_bytes / mib:>12.1f} MiB {run.held_delta_bytes / analytic:>13.3f} {per_loop:>30}"
            )
            if args.json:
                print(json.dumps({"analytic_kv_bytes": analytic, **run.to_dict()}))


if __name__ == "__main__":
    main()
