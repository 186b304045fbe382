"""Training throughput and memory: tokens/s, MFU and the measured peak vs ``melt profile training``'s plan.

For each phase (1, 2) and sequence length, one config = a fresh process that runs a warm-up step
and ``--steps`` timed steps of melt's own training step (``DistillObjective`` / ``StudentLoss``,
AdamW, clipping; bf16 autocast and a bf16 teacher on CUDA), stopped after ``--time-cap`` seconds
(``profiling.training.measure_training_step``). The model: the Ouro-1.4B shape (24 layers, 4 loops,
hidden 2048, vocabulary 49,152) with random weights, converted to MELT with chunks of ``--chunk-size``.

MFU = model FLOPs per token (``training.flops``: student forward + backward, teacher forward, the
planner's ``flops_per_token``) x tokens/s / the device's peak (``--peak-tflops``, default 989:
H100/H200 dense bf16). On a CPU MFU is shown only with ``--peak-tflops``.

Usage: python benchmarks/bench_training.py [--device cuda] [--seq-lens 2048,10000] [--phases 1,2]
       python benchmarks/bench_training.py --device cpu --quick      (a small shape, a smoke test)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from melt_core.checkpoints import build_model, convert_ouro_to_melt, save_checkpoint
from melt_core.checkpoints.presets import preset_config
from melt_core.checkpoints.random_model import init_weights
from melt_core.errors import MeltError
from melt_core.models import MeltSettings, config_from_dict
from melt_core.profiling.training import TrainingPlanArgs, measure_training_step, training_plan
from melt_core.runtime import set_threads

H100_PEAK_TFLOPS = 989.0  # dense bf16 of an H100 / H200 SXM
QUICK_SHAPE = dict(
    num_hidden_layers=2,
    hidden_size=128,
    intermediate_size=352,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=64,
    vocab_size=2048,
)


def write_models(root: Path, quick: bool, chunk_size: int, max_len: int) -> Path:
    """A random Ouro checkpoint of the 1.4B shape (or ``QUICK_SHAPE``) in bf16, and its MELT
    conversion; returns the MELT folder (its melt.source is the teacher)."""
    raw = preset_config("ouro-1.4b")
    if quick:
        raw.update(QUICK_SHAPE)
    raw["max_position_embeddings"] = max(raw["max_position_embeddings"], max_len)
    model = build_model(config_from_dict(raw), "cpu", torch.float32)
    init_weights(model, seed=0)
    ouro = save_checkpoint(model, root / "ouro", dtype="bf16")
    del model
    return convert_ouro_to_melt(ouro, root / "melt", MeltSettings(chunk_size=chunk_size))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="a small shape and short sequences (a CPU smoke test)")
    p.add_argument("--phases", default="1,2")
    p.add_argument("--seq-lens", default=None, help="comma-separated (default 2048,10000; --quick 256,512)")
    p.add_argument("--chunk-size", type=int, default=None, help="default 500 (--quick 64)")
    p.add_argument("--no-checkpoint-chunks", action="store_true", help="keep every chunk's activations")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=2, help="timed steps per config (after one warm-up step)")
    p.add_argument("--time-cap", type=float, default=None, help="seconds per config (default 300; --quick 120)")
    p.add_argument("--peak-tflops", type=float, default=None, help=f"default {H100_PEAK_TFLOPS:g} on CUDA")
    p.add_argument("--json", action="store_true", help="one JSON line per config")
    args = p.parse_args()
    seq_lens = [int(s) for s in (args.seq_lens or ("256,512" if args.quick else "2048,10000")).split(",")]
    chunk = args.chunk_size or (64 if args.quick else 500)
    cap = args.time_cap or (120.0 if args.quick else 300.0)
    cuda = args.device.startswith("cuda")
    if not cuda:
        set_threads()  # $MELT_THREADS, else the free cores: the measured steps use as many
    peak = args.peak_tflops or (H100_PEAK_TFLOPS if cuda else None)
    device_name = torch.cuda.get_device_name(0) if cuda else "CPU"
    print(
        f"training benchmark on {device_name} ({args.device}), torch {torch.__version__}; "
        f"{'quick shape' if args.quick else 'Ouro-1.4B shape'}, random weights, chunks of {chunk}, "
        f"checkpointed chunks {'off' if args.no_checkpoint_chunks else 'on'}, micro-batch {args.micro_batch}, "
        f"{args.steps} timed step(s), cap {cap:.0f} s per config",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        melt = write_models(Path(tmp), args.quick, chunk, max(seq_lens))
        print(f"   random checkpoints written in {time.perf_counter() - start:.0f} s", flush=True)
        for phase in args.phases.split(","):
            for seq_len in seq_lens:
                run_config(melt, phase, seq_len, chunk, args, cap, peak)


def run_config(melt: Path, phase: str, seq_len: int, chunk: int, args, cap: float, peak: float | None) -> None:
    plan_args = TrainingPlanArgs(
        checkpoint=melt,
        phase=phase,
        seq_len=seq_len,
        chunk_size=chunk,
        micro_batch=args.micro_batch,
        checkpoint_chunks=not args.no_checkpoint_chunks,
        device="cuda" if args.device.startswith("cuda") else "cpu",
    )
    plan = training_plan(plan_args)
    row = {
        "phase": phase,
        "seq_len": seq_len,
        "chunk_size": chunk,
        "checkpoint_chunks": plan.checkpoint_chunks,
        "planned_peak_bytes": plan.peak_bytes_per_gpu,
        "flops_per_token": plan.flops_per_token,
    }
    head = f"   phase {phase} seq {seq_len:>6,}: planned peak {plan.peak_bytes_per_gpu / 1e9:8.3f} GB"
    try:
        m = measure_training_step(plan_args, steps=args.steps, timeout=cap)
    except subprocess.TimeoutExpired:
        row["error"] = f"over the time cap of {cap:.0f} s"
    except MeltError as e:  # out of memory, among others: reported, the next config runs
        row["error"] = str(e)
    else:
        mfu = plan.flops_per_token * m.tokens_per_s / (peak * 1e12) if peak else None
        row.update(
            tokens_per_s=m.tokens_per_s,
            mfu=mfu,
            measured_peak_bytes=m.measured_peak_bytes,
            measured_over_planned=m.measured_peak_bytes / plan.peak_bytes_per_gpu,
            memory_kind=m.memory_kind,
            loss=m.loss,
        )
    if args.json:
        print(json.dumps(row), flush=True)
    elif "error" in row:
        print(f"{head}; {row['error']}", flush=True)
    else:
        mfu_text = f"MFU {row['mfu']:6.1%}" if row["mfu"] is not None else "MFU -"
        print(
            f"{head}, measured {row['measured_peak_bytes'] / 1e9:8.3f} GB ({row['measured_over_planned']:.2f}x, "
            f"{row['memory_kind']}); {row['tokens_per_s']:9,.1f} tokens/s, {mfu_text} "
            f"({plan.flops_per_token / 1e9:.1f} GFLOP/token)",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
