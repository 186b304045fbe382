"""Decode speed: melt-Ouro and melt-MELT, eager and compiled, against the memory-bandwidth floor.

For each model (the built-in example LoopLM, 3.5M parameters; with ``--medium``, a random
157M-parameter Ouro-format model, hidden 1024, 12 layers) and its MELT conversion (same weights),
greedy decoding at batch 1 after a short prompt, the variants interleaved round by round (median of
``--rounds``):

- ``eager``: the ordinary step (``model(ids, cache=cache)``);
- ``compiled``: ``melt generate --compile``'s fixed-shape step, one ``torch.compile``d decoder block
  that every layer and loop reuses; ``fused`` (the example model only): the same with fused
  projections (the default on CUDA only); each compiled variant's start-up (its first call, which
  compiles it; ``--cold``: into an empty inductor cache) is printed too;
- ``matvecs``: the step's matrix-vector products alone, each weight matrix as the model stores it
  (what the step would cost with no other work, at this machine's speed on these matrix sizes).

The floor of one decode step is the bytes it must read: the layer stack's weights once per loop,
the final norm, exit gate and LM head once, one embedding row, and the KV rows attended to, divided
by the GEMV bandwidth of this machine (a large fp32 matrix-vector product), measured again in every
round, next to the steps it is the floor of (this VM's bandwidth drifts by tens of percent over
minutes); "x floor" is the median over rounds of step / floor. The reference Ouro code is measured too when
``MELT_REFERENCE_OURO_PYTHON`` names a Python whose environment has transformers 4.56 and
``MELT_REFERENCE_OURO_CODE`` a folder with a public copy of Ouro's ``configuration_ouro.py`` and
``modeling_ouro.py`` (never part of melt): the checkpoint is copied next to them and loaded with
``trust_remote_code``. Without them that row is skipped.

Usage: python benchmarks/bench_decode.py [--medium] [--no-example] [--new-tokens 32] [--rounds 3]
[--threads N] [--cold]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import decode_step_seconds, step_weight_bytes
from torch import nn

from melt_core import load_model
from melt_core.checkpoints import melt_from_ouro
from melt_core.checkpoints.builtin import resolve as resolve_checkpoint
from melt_core.checkpoints.random_model import write_random_ouro
from melt_core.models import MeltSettings

MEDIUM = dict(
    vocab_size=16384,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=12,
    num_attention_heads=16,
    num_key_value_heads=16,
    total_ut_steps=4,
)


def gemv_bandwidth(size: int = 8192, repeats: int = 20) -> float:
    """Bytes per second of y = W x with W (size x size) fp32, which streams W from memory."""
    w, x = torch.randn(size, size), torch.randn(size)
    for _ in range(3):
        w @ x
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        w @ x
        times.append(time.perf_counter() - start)
    return w.nbytes / statistics.median(times)


@torch.no_grad()
def matvec_seconds(model, loops: int, repeats: int = 3) -> float:
    """The matrix-vector products of one decode step alone (best of ``repeats``): every weight
    matrix of the layer stack once per loop, then the LM head, at batch 1 — what a step costs with
    no other work, on this machine's own matrix sizes."""
    matrices = [m.weight for layer in model.model.layers for m in layer.modules() if isinstance(m, nn.Linear)]
    x = {n: torch.randn(1, n) for n in {w.shape[1] for w in matrices + [model.lm_head.weight]}}
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(loops):
            for w in matrices:
                F.linear(x[w.shape[1]], w)
        F.linear(x[model.lm_head.weight.shape[1]], model.lm_head.weight)
        best = min(best, time.perf_counter() - start)
    return best


def reference_checkpoint(checkpoint: Path, into: Path) -> Path | None:
    """A copy of ``checkpoint`` that loads with the reference code, or None when it is not set up."""
    code = os.environ.get("MELT_REFERENCE_OURO_CODE")
    if not (os.environ.get("MELT_REFERENCE_OURO_PYTHON") and code):
        return None
    out = into / f"reference-{checkpoint.name}"
    shutil.copytree(checkpoint, out, dirs_exist_ok=True)
    for name in ("configuration_ouro.py", "modeling_ouro.py"):
        shutil.copy(Path(code) / name, out / name)
    config = json.loads((out / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_ouro.OuroConfig",
        "AutoModelForCausalLM": "modeling_ouro.OuroForCausalLM",
    }
    (out / "config.json").write_text(json.dumps(config))
    return out


def reference_seconds(checkpoint: Path, prompt: torch.Tensor, new_tokens: int) -> float | None:
    """Seconds per decode step of the reference Ouro code in its own environment, or None."""
    python = os.environ["MELT_REFERENCE_OURO_PYTHON"]
    script = f"""
import time, torch
from transformers import AutoModelForCausalLM
torch.set_num_threads({torch.get_num_threads()})
m = AutoModelForCausalLM.from_pretrained({str(checkpoint)!r}, trust_remote_code=True, torch_dtype=torch.float32).eval()
ids = torch.tensor({prompt.tolist()})
with torch.no_grad():
    out = m(ids, use_cache=True); past = out.past_key_values; tok = out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range({new_tokens - 1}):
        out = m(tok, past_key_values=past, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
print((time.perf_counter() - start) / {new_tokens - 1})
"""
    result = subprocess.run([python, "-c", script], capture_output=True, text=True)
    if result.returncode != 0:
        print(f"reference Ouro failed: {result.stderr.strip().splitlines()[-1:]}")
        return None
    return float(result.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--medium", action="store_true", help="also a random 157M-parameter model")
    p.add_argument("--no-example", action="store_true", help="skip the example model")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--cold", action="store_true", help="compile into an empty inductor cache (a cold start)")
    args = p.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.cold:  # read when inductor first writes: every compilation below starts from nothing on disk
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch 1, {args.prompt_tokens}-token "
        f"prompt, {args.new_tokens} new tokens, median of {args.rounds} interleaved rounds"
    )
    tmp = tempfile.TemporaryDirectory()
    checkpoints = {} if args.no_example else {"example": resolve_checkpoint("example")}
    if args.medium:
        checkpoints["medium"] = write_random_ouro(Path(tmp.name) / "medium", seed=0, **MEDIUM)
    for label, checkpoint in checkpoints.items():
        ouro = load_model(checkpoint, dtype="fp32")
        melt = melt_from_ouro(ouro, MeltSettings(chunk_size=32))
        prompt = torch.randint(
            3, ouro.config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0)
        )
        ref_dir = reference_checkpoint(Path(checkpoint), Path(tmp.name))
        modes = [("eager", False, None), ("compiled", True, None)]
        if label == "example":
            modes.append(("fused", True, True))
        variants = [(kind, model, *mode) for kind, model in (("ouro", ouro), ("melt", melt)) for mode in modes]
        startup: dict[tuple[str, str], float] = {}
        for kind, model, mode, compiled, fuse in variants:  # warm-up and compilation, at the measured shapes
            began = time.perf_counter()
            decode_step_seconds(model, prompt, args.new_tokens, decode="compiled" if compiled else "eager", fuse=fuse)
            startup[kind, mode] = time.perf_counter() - began
        loops = ouro.config.total_ut_steps
        kv_rows = args.prompt_tokens + args.new_tokens // 2  # rows attended, on average over the steps
        floors = {
            kind: step_weight_bytes(model, loops) + kv_rows * model.config.kv_bytes_per_token(model.dtype, loops)
            for kind, model in (("ouro", ouro), ("melt", melt))
        }
        times: dict[tuple[str, str], list[float]] = {(v[0], v[2]): [] for v in variants}
        ratios: dict[tuple[str, str], list[float]] = {(v[0], v[2]): [] for v in variants}
        matvec: dict[str, list[float]] = {"ouro": [], "melt": []}
        bandwidths: list[float] = []
        reference: list[float] = []
        for r in range(args.rounds):
            bandwidth = gemv_bandwidth()
            for kind, model in (("ouro", ouro), ("melt", melt)):
                matvec[kind].append(matvec_seconds(model, loops))
            for kind, model, mode, compiled, fuse in variants[r % len(variants) :] + variants[: r % len(variants)]:
                seconds = decode_step_seconds(
                    model, prompt, args.new_tokens, decode="compiled" if compiled else "eager", fuse=fuse
                )
                times[kind, mode].append(seconds)
                ratios[kind, mode].append(seconds * bandwidth / floors[kind])
            bandwidths.append(bandwidth)
            if ref_dir is not None:
                seconds = reference_seconds(ref_dir, prompt, args.new_tokens)
                if seconds is not None:
                    reference.append(seconds)
        bandwidth = statistics.median(bandwidths)
        print(
            f"{label}: {sum(p.numel() for p in ouro.parameters()) / 1e6:.1f}M parameters, {loops} loops; GEMV "
            f"bandwidth {min(bandwidths) / 1e9:.1f}-{max(bandwidths) / 1e9:.1f} GB/s over the rounds"
        )
        print(
            f"{'model':8} {'kind':5} {'variant':9} {'ms/step':>8} {'tok/s':>7} {'floor ms':>8} {'x floor':>7} "
            f"{'vs eager':>8}"
        )
        for kind in ("ouro", "melt"):
            seconds, floor_ms = statistics.median(matvec[kind]), floors[kind] / bandwidth * 1e3
            x_floor = statistics.median([m * b / floors[kind] for m, b in zip(matvec[kind], bandwidths, strict=True)])
            print(
                f"{label:8} {kind:5} {'matvecs':9} {seconds * 1e3:8.2f} {'':7} {floor_ms:8.2f} {x_floor:7.2f}"
                "   (the step's matrix-vector products alone)"
            )
        for kind, _, mode, _, _ in variants:
            step = statistics.median(times[kind, mode])
            eager = statistics.median(times[kind, "eager"])
            floor_ms, x_floor = floors[kind] / bandwidth * 1e3, statistics.median(ratios[kind, mode])
            print(
                f"{label:8} {kind:5} {mode:9} {step * 1e3:8.2f} {1 / step:7.1f} {floor_ms:8.2f} {x_floor:7.2f} "
                f"{eager / step:7.2f}x"
            )
        for (kind, mode), seconds in startup.items():
            if mode != "eager":
                print(f"{label:8} {kind:5} {mode:9} start-up {seconds:.1f} s (the first decode, compiling the step)")
        melt_ouro = statistics.median(times["ouro", "compiled"]) / statistics.median(times["melt", "compiled"])
        print(f"{label:8} melt / ouro decode speed, compiled: {melt_ouro:.2f}")
        if reference:
            step = statistics.median(reference)
            ours = statistics.median(times["ouro", "compiled"])
            print(
                f"{label:8} {'ouro':5} {'reference':9} {step * 1e3:8.2f} {1 / step:7.1f}   "
                f"melt compiled is {step / ours:.2f}x faster"
            )
        else:
            print(f"{label:8} ouro  reference  skipped (set MELT_REFERENCE_OURO_PYTHON and MELT_REFERENCE_OURO_CODE)")


if __name__ == "__main__":
    main()
