"""One short GPU check of melt, for a lent device (about 5 minutes on an H200).

Runs from the working tree (``PYTHONPATH=. python benchmarks/gpu_check.py``) with what the device
image has (torch with CUDA, transformers, accelerate, typer, rich, safetensors) and only models
melt makes itself. Every section prints its numbers; a failed section prints its error and the
next one runs.

1. correctness: the example LoopLM and its MELT conversion, CUDA bf16 and fp32 vs CPU fp32 logits
   (max error, top-1 agreement), greedy decoding on CUDA == on CPU (fp32), and every decode path of
   the engine (static, graph, compiled) == eager, padded batch;
2. decode speed of an Ouro-1.4B-shaped model with random weights (bf16), every decode path (eager,
   CUDA graph, compiled) at batch 1 and 32, against the HBM floor (the layers' weights x loops, the
   head once, + KV read, over the bandwidth of a large on-device copy), MELT/Ouro, start-up times;
3. prefill: MELT in chunks of 500 (full chunks as captured graphs) vs Ouro's one-pass prefill;
4. transformers ``generate()`` through melt's AutoModel vs the engine's own decode, per token;
5. throughput at a fixed KV budget (40 GB of cache, 8K context): the largest batch each model's cache
   allows, decode tokens/s there;
6. CUDA peak memory of prefill + decode vs the analytic KV bytes, Ouro vs MELT, 1 and 4 loops;
7. a few training steps under accelerate in bf16 (``melt transition`` on the example's MELT);
8. training throughput and memory (``bench_training.py``): phases 1 and 2 of the Ouro-1.4B shape at
   2,048 and 10,000 tokens, tokens/s, MFU and the measured peak vs ``melt profile training``'s plan,
   under its own time cap (``TRAINING_BENCH_CAP_S``).

Every section stops at its own time cap (``CAPS``) and the next one runs.

Usage: PYTHONPATH=. python benchmarks/gpu_check.py [--device cuda] [--quick] [--sections 1-6]
(sections 1-6 take at most 14 minutes by their caps, about 6 on an H200 by design; 7-8 another 9 by
theirs: run them as two calls where one command is limited to 10 minutes.)
(``--device cpu --quick`` runs the same code on a CPU, small, as a smoke test.)
"""

from __future__ import annotations

import argparse
import copy
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import decode_step_seconds, step_weight_bytes

from melt_core import load_model
from melt_core.checkpoints import build_model, melt_from_ouro
from melt_core.checkpoints.presets import preset_config
from melt_core.checkpoints.random_model import init_weights
from melt_core.inference import Sampler, SamplingSettings
from melt_core.inference.engine import Engine, EngineOptions
from melt_core.models import MeltSettings, config_from_dict
from melt_core.profiling.measure import measure_generation


class SectionTimeout(Exception):
    pass


def _timeout(signum, frame):
    raise SectionTimeout


def section(title: str, cap_s: int = 120):
    """A section of the check: its title, then its lines; an error or ``cap_s`` seconds end it (the
    next one runs)."""

    def wrap(fn):
        def run(*args, **kwargs):
            print(f"\n== {title} (cap {cap_s} s)", flush=True)
            start = time.perf_counter()
            signal.signal(signal.SIGALRM, _timeout)
            signal.alarm(cap_s)
            try:
                fn(*args, **kwargs)
            except SectionTimeout:
                print(f"   stopped at the section's cap of {cap_s} s", flush=True)
            except Exception:  # report and go on: one short run should say as much as it can
                traceback.print_exc(limit=3)
            finally:
                signal.alarm(0)
            print(f"   ({time.perf_counter() - start:.1f} s)", flush=True)

        return run

    return wrap


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@section("1. correctness: CUDA bf16 / fp32 vs CPU fp32, every decode path", 150)
def correctness(device: torch.device) -> None:
    ids = torch.randint(3, 4096, (4, 128), generator=torch.Generator().manual_seed(0))
    ouro = load_model("example", dtype="fp32")
    for kind, cpu in (("ouro", ouro), ("melt", melt_from_ouro(ouro, MeltSettings(chunk_size=32)))):
        with torch.no_grad():
            reference = cpu(ids).logits.float()
            for dtype in (torch.float32, torch.bfloat16):
                model = copy.deepcopy(cpu).to(device=device, dtype=dtype)
                logits = model(ids.to(device)).logits.float().cpu()
                err = (logits - reference).abs().max().item()
                agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
                ref_logp, logp = F.log_softmax(reference, -1), F.log_softmax(logits, -1)
                kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean()  # KL(cpu fp32 || device), per token
                print(f"   {kind} {str(dtype)[6:]:8}: max |logit err| {err:.2e}, top-1 agree {agree:.2%}, KL {kl:.2e}")
        tokens = []
        for model in (cpu, copy.deepcopy(cpu).to(device)):
            prompt = ids[:2, :16].to(model.device)
            engine = Engine(model)
            steps = engine.generate(engine.new_cache(2, 48), prompt, None, Sampler(SamplingSettings()), 32)
            tokens.append(torch.stack(list(steps), 1).cpu())
        print(f"   {kind} greedy decode fp32, 32 tokens x 2 rows: {device} == cpu: {torch.equal(*tokens)}")
        model = copy.deepcopy(cpu).to(device)
        prompt, mask = ids[:3, :20].to(device), torch.ones(3, 20, dtype=torch.long, device=device)
        mask[1, :5] = mask[2, :11] = 0
        by_path = {}
        for path in decode_paths(device):
            engine = Engine(model, EngineOptions(decode=path, chunk_size=8 if kind == "melt" else None))
            steps = engine.generate(engine.new_cache(3, 64), prompt, mask, Sampler(SamplingSettings()), 24)
            by_path[path] = torch.stack(list(steps), 1)
        same = {path: torch.equal(tokens, by_path["eager"]) for path, tokens in by_path.items()}
        print(f"   {kind} greedy, padded batch of 3, every decode path == eager: {same}")


def decode_paths(device: torch.device) -> tuple[str, ...]:
    return ("eager", "static", "graph", "compiled") if device.type == "cuda" else ("eager", "static", "compiled")


def hbm_bandwidth(device: torch.device) -> float:
    x = torch.empty(2**28, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync(device)
    times = []
    for _ in range(10):
        start = time.perf_counter()
        y.copy_(x)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * x.nbytes / statistics.median(times)  # read + write


def random_model(device: torch.device, quick: bool, melt: bool):
    raw = preset_config("ouro-1.4b")
    if quick:
        raw.update(
            num_hidden_layers=4,
            hidden_size=512,
            intermediate_size=1408,
            num_attention_heads=8,
            num_key_value_heads=8,
            head_dim=64,
            vocab_size=8192,
        )
    config = config_from_dict(raw)
    model = build_model(config, device="cpu", dtype=torch.float32)
    init_weights(model, seed=0)
    if melt:
        model = melt_from_ouro(model, MeltSettings(chunk_size=128))
    return model.to(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).eval()


def step_seconds(model, batch: int, prompt: int, steps: int, path: str, device: torch.device) -> float:
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt), device=device)
    return decode_step_seconds(model, ids, steps, decode=path)


@section("2. decode speed vs the HBM floor, every path (Ouro-1.4B shape, random bf16 weights)", 240)
def speed(device: torch.device, quick: bool) -> None:
    bandwidth = hbm_bandwidth(device)
    print(f"   measured copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    prompt, steps = (64, 16) if quick else (512, 48)
    times: dict[tuple[str, int, str], float] = {}
    for melt in (False, True):
        kind = "melt" if melt else "ouro"
        model = random_model(device, quick, melt)
        loops = model.config.total_ut_steps
        weights = step_weight_bytes(model, loops)
        for batch in (1, 8) if quick else (1, 32):
            for path in decode_paths(device)[:1] + decode_paths(device)[2:]:  # eager, graph (CUDA), compiled
                began = time.perf_counter()
                step_seconds(model, batch, prompt, 4, path, device)  # start-up: compile / capture, warm-up
                startup = time.perf_counter() - began
                step = times[kind, batch, path] = step_seconds(model, batch, prompt, steps, path, device)
                kv = batch * (prompt + steps // 2) * model.config.kv_bytes_per_token(model.dtype, loops)
                floor = (weights + kv) / bandwidth
                ratio = f", MELT/Ouro {times['ouro', batch, path] / step:.2f}" if melt else ""
                print(
                    f"   {kind} batch {batch:3} {path:8}: {step * 1e3:7.2f} ms/step, {batch / step:8.1f} tok/s, "
                    f"floor {floor * 1e3:6.2f} ms ({step / floor:.2f}x floor){ratio}; start-up {startup:.1f} s",
                    flush=True,
                )
        del model


@section("3. prefill: MELT chunks of 500 vs Ouro's one pass", 90)
def prefill_speed(device: torch.device, quick: bool) -> None:
    tokens = 512 if quick else 8000
    seconds = {}
    for melt in (False, True):
        kind = "melt" if melt else "ouro"
        model = random_model(device, quick, melt)
        ids = torch.randint(3, model.config.vocab_size, (1, tokens), device=device)
        engine = Engine(model, EngineOptions(chunk_size=500 if melt else None))
        cache = engine.new_cache(1, tokens + 1)
        engine.prefill(cache, ids)  # start-up: the chunk's graph, kernels
        cache.reset()
        sync(device)
        began = time.perf_counter()
        engine.prefill(cache, ids)
        sync(device)
        seconds[kind] = time.perf_counter() - began
        print(f"   {kind} prefill {tokens:,} tokens ({engine.path}): {tokens / seconds[kind]:,.0f} tok/s", flush=True)
        del model, cache, engine
    print(f"   MELT/Ouro prefill throughput: {seconds['ouro'] / seconds['melt']:.2f}")


@section("4. transformers generate() through melt's AutoModel vs the engine", 120)
def hf_generate(device: torch.device, quick: bool) -> None:
    from melt_core.integrations.hf import HFMeltForCausalLM, MeltHFConfig

    model = random_model(device, quick, True)
    hf = HFMeltForCausalLM(MeltHFConfig(**model.config.to_dict()))
    hf.load_state_dict(model.state_dict())
    hf = hf.to(device=device, dtype=model.dtype).eval()
    ids = torch.randint(3, model.config.vocab_size, (1, 128), device=device)
    new = 16 if quick else 64

    def per_token(run) -> float:
        run(4)  # start-up
        sync(device)
        began = time.perf_counter()
        run(new)
        sync(device)
        short = time.perf_counter() - began
        began = time.perf_counter()
        run(2 * new)
        sync(device)
        return (time.perf_counter() - began - short) / new  # the prefill cancels out

    def melt_run(n: int) -> torch.Tensor:
        engine = Engine(model)
        return torch.stack(
            list(engine.generate(engine.new_cache(1, 128 + n), ids, None, Sampler(SamplingSettings()), n)), 1
        )

    def hf_run(n: int) -> torch.Tensor:
        return hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)[:, 128:]

    same = torch.equal(melt_run(new), hf_run(new))
    rounds = [(per_token(melt_run), per_token(hf_run)) for _ in range(3)]  # interleaved: noise hits both
    engine_s, hf_s = (statistics.median(r[i] for r in rounds) for i in (0, 1))
    print(
        f"   per token (median of 3 interleaved rounds): engine {engine_s * 1e3:.2f} ms, transformers "
        f"generate() {hf_s * 1e3:.2f} ms ({hf_s / engine_s:.2f}x); same greedy tokens: {same}"
    )


@section("5. throughput at a fixed KV budget (40 GB of cache, 8K context)", 150)
def fixed_budget(device: torch.device, quick: bool) -> None:
    budget, context, new = (2**28, 512, 8) if quick else (40 * 10**9, 8192, 16)
    tok_s = {}
    for melt in (False, True):
        kind = "melt" if melt else "ouro"
        model = random_model(device, quick, melt)
        per_row = model.config.kv_bytes_per_token(model.dtype) * (context + new)
        batch = max(1, budget // per_row)
        ids = torch.randint(3, model.config.vocab_size, (batch, context), device=device)
        step = decode_step_seconds(model, ids, new, decode="auto")
        tok_s[kind] = batch / step
        print(
            f"   {kind}: batch {batch} fits {budget / 1e9:.1f} GB of cache; decode {tok_s[kind]:,.0f} tok/s", flush=True
        )
        del model, ids
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"   MELT/Ouro tokens/s at the same KV budget: {tok_s['melt'] / tok_s['ouro']:.2f}")


@section("6. CUDA peak memory vs analytic KV", 90)
def memory(device: torch.device, quick: bool) -> None:
    seq = 256 if quick else 4096
    for melt in (False, True):
        model = random_model(device, quick, melt)
        for loops in (1, 4):
            run = measure_generation(model, loops=loops, seq_len=seq, decode_tokens=4, chunk_size=512)
            analytic = model.config.kv_bytes_per_token(model.dtype, loops) * seq
            print(
                f"   {'melt' if melt else 'ouro'} loops {loops} seq {seq}: cache {run.cache_bytes / 2**20:.1f} MiB "
                f"(analytic {analytic / 2**20:.1f}), held above baseline {run.held_delta_bytes / 2**20:.1f} MiB, "
                f"peak above baseline {run.peak_delta_bytes / 2**20:.1f} MiB ({run.memory_kind})"
            )
        del model


@section("7. training steps under accelerate (bf16 mixed precision)", 90)
def training(device: torch.device) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        melt = Path(tmp) / "melt"
        cli = [sys.executable, "-m", "melt_cli.app"]
        subprocess.run([*cli, "convert", "example", str(melt), "--chunk-size", "64"], check=True)
        args = [
            *cli,
            "transition",
            str(melt),
            "--data",
            "melt_core/assets/quickstart/train.jsonl.gz",
            "--out",
            str(Path(tmp) / "phase1"),
            "--steps",
            "4",
            "--seq-len",
            "256",
        ]
        args += ["--device", device.type]
        start = time.perf_counter()
        result = subprocess.run(args, capture_output=True, text=True)
        print(f"   melt transition, 4 steps: exit {result.returncode} in {time.perf_counter() - start:.1f} s")
        print("   " + "\n   ".join((result.stdout + result.stderr).strip().splitlines()[-4:]))


TRAINING_BENCH_CAP_S = 420  # the whole section; each config gets a share (``--time-cap``)


@section("8. training tokens/s, MFU and peak memory vs the plan (bench_training.py)", TRAINING_BENCH_CAP_S + 30)
def training_benchmark(device: torch.device, quick: bool) -> None:
    script = Path(__file__).with_name("bench_training.py")
    seq_lens, cap = ("256", 60) if quick else ("2048,10000", 100)
    command = [sys.executable, str(script), "--device", device.type, "--seq-lens", seq_lens, "--steps", "1"]
    command += ["--time-cap", str(cap)] + (["--quick"] if quick else [])
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=TRAINING_BENCH_CAP_S)
    except subprocess.TimeoutExpired as stopped:
        out = stopped.stdout.decode() if isinstance(stopped.stdout, bytes) else stopped.stdout or ""
        print("   " + "\n   ".join(out.strip().splitlines()))
        print(f"   stopped at the section's cap of {TRAINING_BENCH_CAP_S} s")
        return
    print("   " + "\n   ".join((result.stdout + result.stderr).strip().splitlines()[-8:]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="small sizes (a CPU smoke test)")
    p.add_argument(
        "--sections",
        default="1,2,3,4,5,6,7,8",
        help="the sections to run, e.g. 1-6 (the inference engine) in one call and 7,8 (training) in another",
    )
    args = p.parse_args()
    wanted = set()
    for part in args.sections.split(","):
        first, _, last = part.partition("-")
        wanted |= set(range(int(first), int(last or first) + 1))
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"melt GPU check on {name}; torch {torch.__version__}; sections {sorted(wanted)}")
    sections = [
        lambda: correctness(device),
        lambda: speed(device, args.quick),
        lambda: prefill_speed(device, args.quick),
        lambda: hf_generate(device, args.quick),
        lambda: fixed_budget(device, args.quick),
        lambda: memory(device, args.quick),
        lambda: training(device),
        lambda: training_benchmark(device, args.quick),
    ]
    for number, run in enumerate(sections, 1):
        if number in wanted:
            run()


if __name__ == "__main__":
    main()
