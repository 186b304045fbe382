"""Adaptive depth for MELT: quality vs mean loops per token vs decode tokens/s, over exit criteria.

For every setting (full depth; ``--exit-threshold`` values; ``--exit-kl`` values), side by side in
one run:
- quality: held-out sequences are fed token by token through the cache (each position is a decode
  step, exactly as in generation), scored against the next token: loss, KL(full depth || setting)
  and top-1 agreement with full depth, plus the mean loops per token and the compute skipped;
- speed: greedy decoding at batch 1 from a held-out prompt, the settings interleaved round by round
  in a rotating order (median of ``--rounds``), so that a noisy machine affects them alike.

The model is a MELT checkpoint (``--checkpoint``), by default the MELT conversion of the built-in
``example`` LoopLM (gates at their init). Usage:
  python benchmarks/bench_adaptive_depth.py [--checkpoint DIR] [--loops 4] [--sequences 8 --seq-len 128]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from timing import decode_step_seconds

from melt_core import load_model, load_tokenizer
from melt_core.checkpoints import melt_from_ouro
from melt_core.data import PackedSequences
from melt_core.inference.engine import Engine, EngineOptions
from melt_core.models import MeltSettings, is_melt
from melt_core.models.adaptive import AdaptiveDepth
from melt_core.quickstart import VALID_TEXT


def settings(thresholds: list[float], kls: list[float]) -> list[tuple[str, dict | None]]:
    out: list[tuple[str, dict | None]] = [("full depth", None)]
    out += [(f"threshold {t:g}", {"threshold": t}) for t in thresholds]
    out += [(f"kl {k:g}", {"kl": k}) for k in kls]
    return out


def depth_kwargs(depth: dict | None) -> dict:
    return {} if depth is None else {"depth": AdaptiveDepth(**depth)}


@torch.no_grad()
def score(model, data: torch.Tensor, loops: int, depth: dict | None) -> tuple[torch.Tensor, AdaptiveDepth | None]:
    """Per-position log-probabilities (N, S-1, V) of every sequence, fed one token per forward."""
    d = AdaptiveDepth(**depth) if depth is not None else None
    options = EngineOptions(loops=loops, chunk_size=1, decode="eager", **({"exit": d} if d is not None else {}))
    engine = Engine(model, options)
    out = []
    for ids in data:
        cache = engine.new_cache(1, ids.shape[0])
        logits = engine.prefill(cache, ids[None, :-1], all_positions=True)[0]
        out.append(F.log_softmax(logits.float(), -1))
    return torch.stack(out), d


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="a MELT checkpoint (default: the example's MELT conversion)")
    p.add_argument("--loops", type=int, default=None, help="loops at full depth (default: the model's)")
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--thresholds", default="1.0,0.99,0.95,0.9,0.8,0.6,0.4")
    p.add_argument("--kls", default="0.001,0.01,0.05,0.2")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    torch.manual_seed(0)
    if args.checkpoint is None:
        source = "example (MELT conversion, gates at init)"
        model = melt_from_ouro(load_model("example", dtype="fp32"), MeltSettings(chunk_size=16))
        tokenizer = load_tokenizer("example")
    else:
        source = args.checkpoint
        model, tokenizer = load_model(args.checkpoint), load_tokenizer(args.checkpoint)
        if not is_melt(model):
            raise SystemExit(f"{args.checkpoint} is not a MELT checkpoint: adaptive depth skips loops in MELT only")
    model.eval()
    loops = model.config.resolve_loops(args.loops)
    data = PackedSequences.from_path(VALID_TEXT, tokenizer, args.seq_len).sequences[: args.sequences]
    labels = data[:, 1:]
    runs = settings([float(t) for t in args.thresholds.split(",")], [float(k) for k in args.kls.split(",")])
    print(
        f"{source}: {model.config.num_hidden_layers} layers, {loops} loops; {len(data)} x {args.seq_len} held-out "
        f"tokens fed one per step; decode {args.new_tokens} tokens at batch 1, median of {args.rounds} interleaved "
        f"rounds; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )

    reference, _ = score(model, data, loops, None)
    rows = {}
    for name, depth in runs:
        log_probs, d = score(model, data, loops, depth)
        loss = -log_probs.gather(-1, labels[..., None]).mean().item()
        kl = (reference.exp() * (reference - log_probs)).sum(-1).mean().item()
        agree = (log_probs.argmax(-1) == reference.argmax(-1)).float().mean().item()
        mean_loops = loops if d is None else d.stats.mean_loops
        saved = 0.0 if d is None else d.stats.compute_saved
        rows[name] = [loss, kl, agree, mean_loops, saved]

    prompt = data[:1, : min(32, args.seq_len)]
    times: dict[str, list[float]] = {name: [] for name, _ in runs}
    for _, depth in runs:  # warm-up
        decode_step_seconds(model, prompt, 4, loops, **depth_kwargs(depth))
    for r in range(args.rounds):  # each round starts at another setting: no setting is always first
        for name, depth in runs[r % len(runs) :] + runs[: r % len(runs)]:
            times[name].append(decode_step_seconds(model, prompt, args.new_tokens, loops, **depth_kwargs(depth)))

    full_speed = 1 / statistics.median(times["full depth"])
    print(
        f"{'setting':15} {'loss':>8} {'KL(full||set)':>13} {'top-1 = full':>12} {'mean loops':>10} "
        f"{'skipped':>8} {'decode tok/s':>12} {'vs full':>8}"
    )
    for name, _ in runs:
        loss, kl, agree, mean_loops, saved = rows[name]
        speed = 1 / statistics.median(times[name])
        print(
            f"{name:15} {loss:8.4f} {kl:13.2e} {agree:11.2%} {mean_loops:10.2f} {saved:8.1%} "
            f"{speed:12.1f} {speed / full_speed:7.2f}x"
        )


if __name__ == "__main__":
    main()
