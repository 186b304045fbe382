"""Prefill speed: MELT's chunk-wise prefill (eager, and as ``--compile``'s fixed-shape steps) vs
Ouro's one-forward prefill of the same prompt, on the same weights.

MELT must prefill chunk by chunk (each chunk attends to the final rows of the chunks before it), so
a prompt of S tokens is S / C sequential forwards of C tokens each, against Ouro's one forward of S.
For each chunk size the variants are interleaved round by round (median of ``--rounds``):

- ``ouro``: the whole prompt in one forward (Ouro's default);
- ``melt eager``: ``prefill`` with ordinary forwards, one per chunk;
- ``melt static``: the full chunks as ``StaticDecoder`` steps, ``torch.compile``d (what
  ``melt generate --compile`` runs); compiled before timing, once per chunk size.

Usage: python benchmarks/bench_prefill.py [--checkpoint example] [--prompt-tokens 256] [--chunks 8,32,64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from melt_core import load_model
from melt_core.checkpoints import melt_from_ouro
from melt_core.checkpoints.builtin import resolve as resolve_checkpoint
from melt_core.inference.engine import Engine, EngineOptions
from melt_core.models import MeltSettings
from melt_core.runtime import synchronize


@torch.no_grad()
def prefill_seconds(model, ids: torch.Tensor, chunk: int | None, compiled: bool = False) -> float:
    """Seconds to prefill ``ids`` into a new cache (chunks end-aligned, as generation runs them)."""
    engine = Engine(model, EngineOptions(chunk_size=chunk, decode="compiled" if compiled else "eager"))
    cache = engine.new_cache(ids.shape[0], ids.shape[1] + 1)
    synchronize(model.device)
    start = time.perf_counter()
    engine.prefill(cache, ids)
    synchronize(model.device)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="example")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--chunks", default="8,32,64", help="MELT chunk sizes, comma-separated")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    ouro = load_model(resolve_checkpoint(args.checkpoint), dtype="fp32")
    ids = torch.randint(
        3, ouro.config.vocab_size, (args.batch, args.prompt_tokens), generator=torch.Generator().manual_seed(0)
    )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.checkpoint}, batch {args.batch}, "
        f"{args.prompt_tokens}-token prompt, median of {args.rounds} interleaved rounds"
    )
    print(f"{'chunk':>5} {'variant':12} {'ms':>8} {'tok/s':>8} {'vs ouro':>8} {'vs eager':>8}")
    for chunk in (int(c) for c in args.chunks.split(",")):
        melt = melt_from_ouro(ouro, MeltSettings(chunk_size=chunk))
        variants = {
            "ouro": lambda: prefill_seconds(ouro, ids, None),
            "melt eager": lambda m=melt, c=chunk: prefill_seconds(m, ids, c),
            "melt static": lambda m=melt, c=chunk: prefill_seconds(m, ids, c, compiled=True),
        }
        for run in variants.values():  # warm-up; compiles the static chunk step
            run()
        times: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                times[name].append(variants[name]())
        ouro_s, eager_s = statistics.median(times["ouro"]), statistics.median(times["melt eager"])
        for name in names:
            seconds = statistics.median(times[name])
            print(
                f"{chunk:5} {name:12} {seconds * 1e3:8.1f} {ids.numel() / seconds:8.0f} {ouro_s / seconds:7.2f}x "
                f"{eager_s / seconds:7.2f}x"
            )


if __name__ == "__main__":
    main()
