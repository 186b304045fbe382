"""Quality and bytes of every KV-cache format on the built-in example LoopLM, side by side.

For Ouro (the example itself) and its MELT conversion (in memory, gates at their init), every
held-out sequence is prefilled through a cache in chunks, so that each chunk attends to the rows
earlier chunks left in the cache (quantised once their forward is over); the per-position logits
are compared with the same run through a full-precision (fp32) cache: next-token loss, KL(fp32 ||
format) and top-1 agreement, plus the cache's exact bytes per token (a residual window's ring
included). int8 / int4 run once per ``--residuals`` value (the most recent positions kept in fp32).
Usage: python benchmarks/bench_kv_formats.py [--sequences 16 --seq-len 256 --chunk 16 --residuals 0,64]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from melt_core import load_model, load_tokenizer
from melt_core.cache.quantized import KV_DTYPES, kv_format
from melt_core.checkpoints import melt_from_ouro
from melt_core.data import PackedSequences
from melt_core.inference.engine import Engine, EngineOptions
from melt_core.models import MeltSettings
from melt_core.quickstart import VALID_TEXT


@torch.no_grad()
def run(model, sequences, chunk: int, name: str, group: int, residual: int = 0) -> tuple[torch.Tensor, int]:
    fmt = kv_format(name, group, residual)
    logits, nbytes = [], 0
    for ids in sequences:
        engine = Engine(model, EngineOptions(chunk_size=chunk, kv_dtype=fmt))
        cache = engine.new_cache(1, ids.shape[0])
        logits.append(engine.prefill(cache, ids[None], all_positions=True)[0].float())
        nbytes = cache.nbytes() // ids.shape[0]
    return torch.stack(logits), nbytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sequences", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--chunk", type=int, default=16, help="prefill chunk: later chunks read earlier chunks' rows")
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--residuals", default="0,64", help="full-precision windows to try with int8 / int4")
    args = p.parse_args()
    torch.manual_seed(0)
    ouro = load_model("example", dtype="fp32")
    melt = melt_from_ouro(ouro, MeltSettings(chunk_size=args.chunk))
    data = PackedSequences.from_path(VALID_TEXT, load_tokenizer("example"), args.seq_len).sequences[: args.sequences]
    labels = data[:, 1:]
    print(
        f"example LoopLM ({ouro.config.num_hidden_layers} layers, {ouro.config.total_ut_steps} loops, head_dim "
        f"{ouro.config.head_dim}), {len(data)} x {args.seq_len} held-out tokens, chunks of {args.chunk}, "
        f"group size {args.group_size}; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        f"{'model':5} {'kv dtype':9} {'KV B/token':>10} {'vs fp32':>8} {'loss':>8} {'KL(fp32||fmt)':>14} "
        f"{'top-1 agree':>11} {'seconds':>8}"
    )
    for label, model in (("ouro", ouro), ("melt", melt)):
        reference, full_bytes = run(model, data, args.chunk, "fp32", args.group_size)
        ref_logp = F.log_softmax(reference[:, :-1], -1)
        formats = [(k, 0) for k in KV_DTYPES if k not in ("auto", "int8", "int4")]
        formats += [(k, int(r)) for k in ("int8", "int4") for r in args.residuals.split(",")]
        for name, residual in formats:
            start = time.perf_counter()
            logits, per_token = run(model, data, args.chunk, name, args.group_size, residual)
            name = f"{name}+r{residual}" if residual else name
            seconds = time.perf_counter() - start
            logp = F.log_softmax(logits[:, :-1], -1)
            loss = -logp.gather(-1, labels[..., None]).mean().item()
            kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean().item()
            agree = (ref_logp.argmax(-1) == logp.argmax(-1)).float().mean().item()
            print(
                f"{label:5} {name:9} {per_token:>10,} {per_token / full_bytes:>7.3f}x {loss:>8.4f} {kl:>14.2e} "
                f"{agree:>11.2%} {seconds:>8.2f}"
            )


if __name__ == "__main__":
    main()
