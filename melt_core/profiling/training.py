"""``melt profile training``: the memory of one training step per GPU, planned from the config alone.

The plan counts what melt's own training code keeps (``training.distill``, ``training.pretrain``,
``models.melt.MeltForCausalLM.forward_chunkwise``), per process:

- weights: the student's fp32 master weights (sharded over the processes with FSDP);
- gradients: fp32, one per trainable weight (sharded with FSDP);
- optimizer: AdamW's two fp32 moments per trainable weight (sharded with FSDP), and the
  temporaries of its step (one fp32 copy of the weights for the multi-tensor step on CUDA);
- teacher: the frozen Ouro teacher (bf16 on CUDA, fp32 on CPU), never sharded, and the per-loop
  hidden states (and attention taps in phase 2) it hands to the student's loss;
- activations: what autograd saves. Per token, layer and loop: the residual stream, the four
  norms' inputs and outputs, the KV gate's z, 1 - z and latent state, queries and attention output,
  four MLP-width tensors; under bf16 autocast also the bf16 copy of every linear layer's input.
  Per chunk, layer and loop: the keys and values attended over (every row so far) and, after the
  first chunk, the float attention mask. With ``checkpoint_chunks`` only each chunk's outputs are
  kept (its rows: one per layer for MELT and one per (loop, layer) for the phase-1 Ouro rows, its
  hidden states and taps) and one chunk at a time is recomputed; without it every chunk's
  activations are kept, so the keys and values grow with S^2 / C;
- loss buffers: the chunked KD / CE logits of one token chunk (``losses.TOKEN_CHUNK``), fp32.

The peak is the largest of four moments of a step (the teacher's forward, the end of the loss,
the student's backward, the optimizer step); the breakdown is that moment's. ``measure`` runs one
real step of a small checkpoint (``measure_training_step``) to check the plan. The teacher is
replicated on every process; with FSDP the activations are counted as under autocast (fp32 residual
stream), an upper bound where FSDP gathers the weights in bf16.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoints import load_config
from ..checkpoints.presets import PRESET_NAMES, preset_config, resolve_preset
from ..errors import InvalidArgumentError, MeltError
from ..models import OuroConfig, config_from_dict, is_melt
from ..models.chunks import chunk_lengths
from ..runtime import resolve_device
from ..training.flops import training_flops_per_token
from ..training.losses import TOKEN_CHUNK
from .pairs import config_pair, parameter_counts

PHASES = ("1", "2", "pretrain")
FP32 = 4
# One autograd node with its edges and saved-variable slots, as the RSS of a CPU forward whose saved
# tensors are dropped grows per recorded node (about 660-670 B with torch 2.x, rounded up).
GRAPH_NODE_BYTES = 700


@dataclass
class TrainingPlanArgs:
    """``melt profile training``'s inputs: exactly one of ``checkpoint`` and ``preset``."""

    checkpoint: Path | None = None
    preset: str | None = None
    phase: str = "1"  # 1, 2 (distillation) or pretrain
    seq_len: int = 2048
    chunk_size: int | None = None  # default: the MELT config's
    micro_batch: int = 1
    world_size: int = 1
    fsdp: bool | None = None  # default: on when world_size > 1
    checkpoint_chunks: bool = True
    # cuda (bf16 autocast, bf16 teacher) or cpu (fp32); auto: cuda, or with --measure where it runs
    device: str = "auto"
    measure: bool = False
    data: Path | None = None  # the measured step's tokens (default: random ids)
    text_field: str = "text"

    def __post_init__(self) -> None:
        self.phase = str(self.phase)
        if self.phase not in PHASES:
            raise InvalidArgumentError(f"--phase must be 1, 2 or pretrain, got {self.phase!r}")
        for flag, value, least in (
            ("--seq-len", self.seq_len, 2),
            ("--micro-batch", self.micro_batch, 1),
            ("--world-size", self.world_size, 1),
            ("--chunk-size", 1 if self.chunk_size is None else self.chunk_size, 1),
        ):
            if value < least:
                raise InvalidArgumentError(f"{flag} must be >= {least}, got {value}")
        if self.fsdp is None:
            self.fsdp = self.world_size > 1
        if self.fsdp and self.world_size < 2:
            raise InvalidArgumentError("--fsdp shards over the processes of a launch: give --world-size 2 or more")
        if (self.checkpoint is None) == (self.preset is None):
            raise InvalidArgumentError("pass a checkpoint directory or --preset NAME (exactly one)")
        if self.measure and self.checkpoint is None:
            raise InvalidArgumentError(
                "--measure runs a training step: it needs a checkpoint with weights, not a preset"
            )
        if self.measure and self.world_size > 1:
            raise InvalidArgumentError("--measure runs one process: leave --world-size at 1")
        if self.data is not None and not self.measure:
            raise InvalidArgumentError("--data is the measured step's text: it goes with --measure")
        if self.device == "auto":
            self.device = resolve_device("auto").type if self.measure else "cuda"
        elif self.device.split(":")[0] not in ("cuda", "cpu"):
            raise InvalidArgumentError(f"--device must be auto, cuda or cpu for a training plan, got {self.device!r}")


@dataclass
class MeasuredStep:
    """One real training step (after one warm-up step, so that AdamW's moments exist).

    held_bytes: the tensors held between steps, counted (weights, teacher, optimizer moments);
    step_peak_bytes: the peak above the baseline taken just before the step (CUDA allocator, or the
    process RSS sampled in a fresh process); measured_peak_bytes: their sum on CPU, the allocator's
    peak on CUDA."""

    memory_kind: str
    baseline_bytes: int
    held_bytes: int
    step_peak_bytes: int
    measured_peak_bytes: int
    seconds: float
    tokens_per_s: float
    loss: float


@dataclass
class TrainingPlan:
    """Bytes per GPU (GB = 1e9 B). ``breakdown`` sums to ``peak_bytes_per_gpu`` (the moment ``peak_at``);
    ``moments``: the total at each moment of the step; ``held_between_steps_bytes``: weights,
    optimizer moments and teacher weights (what a measured step's baseline holds)."""

    source: str
    model: str
    phase: str
    device: str
    seq_len: int
    chunk_size: int | None
    micro_batch: int
    world_size: int
    fsdp: bool
    checkpoint_chunks: bool
    parameters: int
    trainable_parameters: int
    teacher_parameters: int
    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    teacher_bytes: int
    activations_bytes: int
    loss_buffers_bytes: int
    other_bytes: int
    peak_bytes_per_gpu: int
    peak_at: str
    held_between_steps_bytes: int
    moments: dict[str, int]
    breakdown: dict[str, int]
    flops_per_token: float
    measured: MeasuredStep | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def step_bytes(self) -> int:
        """The peak above what is held between steps (what a measured step adds to its baseline)."""
        return self.peak_bytes_per_gpu - self.held_between_steps_bytes

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["step_bytes"] = self.step_bytes
        if self.measured is not None:
            out["measured_peak_bytes"] = self.measured.measured_peak_bytes
            out["measured_over_planned_step"] = self.measured.step_peak_bytes / max(self.step_bytes, 1)
            out["measured_over_planned_peak"] = self.measured.measured_peak_bytes / max(self.peak_bytes_per_gpu, 1)
        return out


@dataclass(frozen=True)
class _Precision:
    """Bytes of what a step keeps: fp32 everywhere on CPU; bf16 autocast over fp32 weights on CUDA."""

    cuda: bool

    @property
    def low(self) -> int:  # linear outputs, attention inputs/outputs, the teacher
        return 2 if self.cuda else FP32

    @property
    def casts(self) -> int:  # autocast's bf16 copy of a linear's fp32 input (none without autocast)
        return 2 if self.cuda else 0


def _token_bytes(config: OuroConfig, p: _Precision, gate: bool, loops: int, base_rows: bool) -> float:
    """Saved activation bytes of one token at one (layer, loop), context-independent part (see the
    module docstring); ``gate``: MELT's learned KV gate (from loop 2 on), ``base_rows``: phase 1's
    extra k/v projections of u."""
    H, I = config.hidden_size, config.intermediate_size  # noqa: E741
    q = config.num_attention_heads * config.head_dim
    later = (loops - 1) / loops  # share of (layer, loop) pairs that run the gate
    fp32_h = 10 + (3 * later if gate else 0)  # x, 4 x (norm input, normed), u, mlp input; z, 1 - z, h
    cast_h = 5 + (2 * later if gate else 0) + (2 if base_rows else 0)  # q/k/v and gate/up inputs; gate inputs
    small = 4 + config.num_attention_heads  # 4 norms' rstd, attention logsumexp per head
    return fp32_h * H * FP32 + cast_h * H * p.casts + 2 * q * p.low + 4 * I * p.low + small * FP32


def _attention_bytes(config: OuroConfig, p: _Precision, batch: int, queries: int, keys: int, masked: bool) -> float:
    """Per (layer, loop) of one chunk: the keys and values attended over (CUDA: SDPA's bf16 copies)
    and the float mask SDPA makes of the boolean one (one for the batch: no padding)."""
    kv = batch * 2 * keys * config.num_key_value_heads * config.head_dim * p.low
    return kv + (queries * keys * p.low if masked else 0)


def _graph_nodes_per_layer_loop(config: OuroConfig, phase: str) -> float:
    """Autograd nodes a forward records per (chunk, layer, loop), counted on a tiny copy of the model
    (2 layers, 2 loops, 2 chunks of 2 tokens; the final norms and the loss's few nodes are
    amortised in). The graph is kept whole until the backward, checkpointed chunks included."""
    import torch

    from ..checkpoints import build_model

    raw = dict(config.to_dict(), hidden_size=16, intermediate_size=32, num_attention_heads=2)
    raw.update(num_key_value_heads=2, head_dim=8, vocab_size=32, num_hidden_layers=2, total_ut_steps=2)
    tiny = build_model(config_from_dict(raw), "cpu", torch.float32)
    ids = torch.zeros(1, 4, dtype=torch.long)
    with torch.enable_grad():
        if phase == "pretrain":
            hidden, _ = tiny.forward_hidden(ids)
            chunks = 1
        else:
            alpha = 0.5 if phase == "1" else 1.0
            hidden, _ = tiny.forward_chunkwise(ids, chunk_size=2, alpha=alpha, return_attn_outputs=phase == "2")
            chunks = 2
        seen, stack = set(), [sum(h.sum() for h in hidden).grad_fn]
        while stack:
            node = stack.pop()
            if node is not None and node not in seen:
                seen.add(node)
                stack.extend(f for f, _ in node.next_functions)
    return len(seen) / (chunks * 2 * 2)


def _student_moments(config: OuroConfig, args: TrainingPlanArgs, p: _Precision, chunk: int | None) -> dict[str, Any]:
    """Activation bytes of the student's forward and backward for one micro-batch (B sequences)."""
    B, S, T, N = args.micro_batch, args.seq_len, config.total_ut_steps, config.num_hidden_layers
    chunks = len(chunk_lengths(S, chunk))
    graph = _graph_nodes_per_layer_loop(config, args.phase) * chunks * N * T * GRAPH_NODE_BYTES
    H, kv_width = config.hidden_size, 2 * config.num_key_value_heads * config.head_dim
    pretrain = args.phase == "pretrain"
    phase1, taps = args.phase == "1", args.phase == "2"
    per_token = _token_bytes(config, p, gate=not pretrain, loops=T, base_rows=phase1)
    hidden = B * T * S * H * FP32  # per-loop final-norm outputs
    tap_bytes = B * T * N * S * H * FP32 if taps else 0
    if pretrain:  # one full-sequence forward, causal attention without a mask
        acts = (
            N * T * (B * S * per_token + _attention_bytes(config, p, B, S, S, masked=False)) + B * T * S * 2 * H * FP32
        )
        return {"kept": hidden + graph, "chunk": 0, "all_chunks": acts, "activation_grads": hidden + graph}
    sizes = chunk_lengths(S, chunk)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]

    def chunk_acts(i: int) -> float:
        s, keys = sizes[i], starts[i] + sizes[i]
        attention = _attention_bytes(config, p, B, s, keys, masked=i > 0)
        return N * T * (B * s * per_token + attention) + B * T * s * 2 * H * FP32

    rows_melt = B * N * S * kv_width * FP32  # one row per layer, kept in the model's dtype (fp32)
    rows_base = B * T * N * S * kv_width * FP32 if phase1 else 0  # Ouro's per-(loop, layer) rows
    out = {
        "kept": hidden + tap_bytes + rows_melt + rows_base + graph,
        "rows": rows_melt + rows_base + graph,  # what the backward starts from
        "row_grads": rows_melt + rows_base,
        "activation_grads": hidden + tap_bytes,
        "all_chunks": sum(chunk_acts(i) for i in range(len(sizes))),
        "chunk": max(chunk_acts(i) for i in range(len(sizes))),
    }
    return out


def _loss_buffer_bytes(config: OuroConfig, args: TrainingPlanArgs, p: _Precision) -> int:
    """One token chunk's logits through the loss: KD (student and teacher log-probabilities, the
    teacher's probabilities, their difference and product: 5 x fp32, + bf16 logits on CUDA) or CE
    (logits and log-probabilities, and their gradient: 3 x fp32)."""
    n = min(TOKEN_CHUNK, args.micro_batch * args.seq_len)
    per_logit = 3 * FP32 if args.phase == "pretrain" else 5 * FP32 + p.casts
    return int(n * config.vocab_size * per_logit)


def training_plan(args: TrainingPlanArgs) -> TrainingPlan:
    """The planned memory of one training step per process (module docstring); with ``args.measure``
    a real step of the checkpoint is measured in a fresh process and attached."""
    if args.preset is not None:
        key = resolve_preset(args.preset)
        config = config_from_dict(preset_config(key), source=f"preset {key}")
        source, names = key, PRESET_NAMES[key]
    else:
        config = load_config(args.checkpoint)
        source, names = str(args.checkpoint), ("Ouro", "MELT")
    ouro_cfg, melt_cfg = config_pair(config)
    if args.seq_len > ouro_cfg.max_position_embeddings:
        raise InvalidArgumentError(
            f"--seq-len {args.seq_len} exceeds the model's maximum {ouro_cfg.max_position_embeddings} "
            "(max_position_embeddings)"
        )
    pretrain = args.phase == "pretrain"
    student: OuroConfig = ouro_cfg if pretrain else melt_cfg
    chunk = None if pretrain else (args.chunk_size or melt_cfg.melt.chunk_size)
    p = _Precision(cuda=args.device.startswith("cuda"))
    W = args.world_size if args.fsdp else 1
    params, gates = parameter_counts(student)
    H, V = student.hidden_size, student.vocab_size
    trainable = params - (H + 1)  # the exit gate is frozen (distillation; pretraining's default objective)
    embedding = V * H
    teacher_params = 0 if pretrain else parameter_counts(ouro_cfg)[0]

    weights = _ceil(params * FP32, W)
    grads = _ceil(trainable * FP32, W)
    moments = _ceil(2 * trainable * FP32, W)
    teacher_weights = teacher_params * p.low
    other_held, other_step, notes = 0, 0, []
    if args.fsdp:
        # the root unit (embeddings, final norm, heads) stays gathered through forward and backward; one
        # decoder layer is gathered at a time, the next prefetched (bf16 with mixed precision)
        layer = (params - 2 * embedding - H - (H + 1)) // student.num_hidden_layers
        other_step = (2 * embedding + 2 * layer) * p.low + 2 * layer * FP32  # + one layer's unsharded gradients
        notes.append("FSDP: weights, gradients and AdamW moments / world size; one decoder layer gathered at a time")
        notes.append(
            "FSDP: activations are counted as under autocast (fp32 residual stream and rows); with bf16 "
            "parameter gathering they are smaller, so this is an upper bound"
        )
    else:
        if p.cuda:  # autocast caches a bf16 copy of every weight a linear layer reads
            other_step = (trainable - embedding) * 2
        if args.world_size > 1:  # DDP's gradient buckets
            other_held = trainable * FP32
            notes.append("DDP: each process holds the whole model, its gradients and optimizer state")
    optimizer_step_temp = (
        _ceil(trainable * FP32, W) if p.cuda else trainable // max(student.num_hidden_layers, 1) * FP32
    )
    held = weights + moments + teacher_weights + other_held

    acts = _student_moments(student, args, p, chunk)
    loss_buffers = _loss_buffer_bytes(student, args, p)
    B, S, T, N = args.micro_batch, args.seq_len, student.total_ut_steps, student.num_hidden_layers
    teacher_out = 0 if pretrain else B * T * S * H * p.low * (1 + (N if args.phase == "2" else 0))
    teacher_forward = (
        0 if pretrain else B * S * (3 * student.intermediate_size + 6 * H) * p.low + teacher_out
    )  # one layer's transient tensors at a time (no grad)

    if pretrain:
        forward_acts = acts["all_chunks"] + acts["kept"]
        backward_acts = acts["all_chunks"] + acts["activation_grads"]
    else:
        # the loss's backward frees the whole-sequence hidden states, taps and teacher outputs and leaves
        # their gradients; each chunk's backward (last first) adds the gradients of every earlier row, so
        # from the second-to-last chunk on, all of them are held while a chunk is recomputed
        forward_acts = acts["kept"] + (0 if args.checkpoint_chunks else acts["all_chunks"])
        live = acts["chunk"] if args.checkpoint_chunks else acts["all_chunks"]
        backward_acts = acts["rows"] + acts["activation_grads"] + acts["row_grads"] + live
    moments_total = {
        "teacher forward": held + teacher_forward,
        "loss": held + teacher_out + other_step + forward_acts + loss_buffers,
        "backward": held + other_step + backward_acts + grads,
        "optimizer step": held + grads + optimizer_step_temp,
    }
    peak_at = max(moments_total, key=moments_total.get)
    at_loss, at_backward = peak_at == "loss", peak_at == "backward"
    activations = forward_acts if at_loss else backward_acts if at_backward else 0
    breakdown = {
        "weights": weights,
        "gradients": grads if (at_backward or peak_at == "optimizer step") else 0,  # none before the backward
        "optimizer": moments + (optimizer_step_temp if peak_at == "optimizer step" else 0),
        "teacher": teacher_weights
        + (teacher_out if at_loss else 0)
        + (teacher_forward if peak_at == "teacher forward" else 0),
        "activations": activations,
        "loss_buffers": loss_buffers if at_loss else 0,
        "other": other_held + (other_step if (at_loss or at_backward) else 0),
    }
    breakdown = {k: int(round(v)) for k, v in breakdown.items()}
    peak = sum(breakdown.values())
    moments_bytes = {k: int(round(v)) for k, v in moments_total.items()}
    moments_bytes[peak_at] = peak  # the same sum, rounded part by part
    gate_width = H if gates else 0
    if pretrain:
        flops = training_flops_per_token(student, S, head_passes=T)
    else:
        flops = training_flops_per_token(
            student, S, head_passes=T, gate_width=gate_width, teacher=ouro_cfg, teacher_head_passes=T
        )
    plan = TrainingPlan(
        source=source,
        model=names[0] if pretrain else names[1],
        phase=args.phase,
        device="cuda (bf16 autocast, fp32 master weights)" if p.cuda else "cpu (fp32)",
        seq_len=S,
        chunk_size=chunk,
        micro_batch=B,
        world_size=args.world_size,
        fsdp=bool(args.fsdp),
        checkpoint_chunks=args.checkpoint_chunks and not pretrain,
        parameters=params,
        trainable_parameters=trainable,
        teacher_parameters=teacher_params,
        weights_bytes=breakdown["weights"],
        gradients_bytes=breakdown["gradients"],
        optimizer_bytes=breakdown["optimizer"],
        teacher_bytes=breakdown["teacher"],
        activations_bytes=breakdown["activations"],
        loss_buffers_bytes=breakdown["loss_buffers"],
        other_bytes=breakdown["other"],
        peak_bytes_per_gpu=peak,
        peak_at=peak_at,
        held_between_steps_bytes=int(held),
        moments=moments_bytes,
        breakdown=breakdown,
        flops_per_token=flops,
        notes=notes,
    )
    if args.measure:
        plan.measured = measure_training_step(args)
    return plan


def _ceil(n: int, w: int) -> int:
    return -(-n // w)


# A measured step runs in a fresh process whose allocator returns freed blocks to the OS at once, so
# that its RSS follows live memory (glibc: blocks of 16 KiB and up are mapped and unmapped, the heap
# is trimmed on every free, one arena for all threads, so the autograd thread's frees are not kept).
MEASURE_ENV = {"MALLOC_MMAP_THRESHOLD_": "16384", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_ARENA_MAX": "1"}
_RESULT = "measured-step: "


def measure_training_step(args: TrainingPlanArgs, steps: int = 1, timeout: float | None = None) -> MeasuredStep:
    """``steps`` real training steps of ``args.checkpoint`` (after a warm-up step), measured in a fresh
    process (``MEASURE_ENV``), stopped after ``timeout`` seconds (``subprocess.TimeoutExpired``); see
    ``MeasuredStep`` (tokens/s over the ``steps``, the peak of all of them)."""
    import torch

    spec = {
        "checkpoint": str(args.checkpoint),
        "phase": args.phase,
        "seq_len": args.seq_len,
        "chunk_size": args.chunk_size,
        "micro_batch": args.micro_batch,
        "checkpoint_chunks": args.checkpoint_chunks,
        "device": args.device,
        "data": None if args.data is None else str(args.data),
        "text_field": args.text_field,
        "threads": torch.get_num_threads(),
        "steps": steps,
    }
    root = str(Path(__file__).resolve().parents[2])  # the folder holding melt_core
    env = {**os.environ, **MEASURE_ENV, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    code = "import sys; from melt_core.profiling.training import measure_here; measure_here(sys.argv[1])"
    command = [sys.executable, "-c", code, json.dumps(spec)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    lines = [line for line in result.stdout.splitlines() if line.startswith(_RESULT)]
    if result.returncode != 0 or not lines:
        errors = [line for line in result.stderr.strip().splitlines() if line.strip()]
        raise MeltError(f"the measured training step failed: {errors[-1] if errors else f'exit {result.returncode}'}")
    return MeasuredStep(**json.loads(lines[-1].removeprefix(_RESULT)))


def measure_here(spec_json: str) -> None:
    """The measuring process (``measure_training_step``): prints one ``measured-step:`` JSON line."""
    import torch

    from ..runtime import PeakMemory, current_rss_bytes, release_free_heap, synchronize

    spec = json.loads(spec_json)
    torch.set_num_threads(spec.pop("threads"))
    steps = spec.pop("steps")
    device = resolve_device(spec.pop("device"))
    step, held_bytes, tokens = _training_step(spec, device)
    step()  # warm-up: AdamW makes its moments, as every later step finds them
    held = held_bytes()
    gc.collect()
    hwm = _HighWater() if device.type == "cpu" else None
    if hwm is not None and hwm.available:
        release_free_heap()
        baseline = current_rss_bytes() or 0
        hwm.reset()
        start = time.perf_counter()
        loss = [step() for _ in range(steps)][-1]
        seconds = time.perf_counter() - start
        kind, step_peak = "process_rss_high_water", max(0, hwm.read() - baseline)
        measured_peak = held + step_peak
    else:
        with PeakMemory(device) as meter:
            start = time.perf_counter()
            loss = [step() for _ in range(steps)][-1]
            synchronize(device)
            seconds = time.perf_counter() - start
        kind, baseline, step_peak = meter.kind, meter.baseline, meter.delta
        measured_peak = meter.peak if device.type == "cuda" else held + step_peak
    result = MeasuredStep(
        memory_kind=kind,
        baseline_bytes=int(baseline),
        held_bytes=int(held),
        step_peak_bytes=int(step_peak),
        measured_peak_bytes=int(measured_peak),
        seconds=seconds,
        tokens_per_s=tokens * steps / seconds,
        loss=loss,
    )
    print(_RESULT + json.dumps(asdict(result)), flush=True)


class _HighWater:
    """The kernel's own peak RSS of this process (``VmHWM``), reset through ``/proc/self/clear_refs``
    (Linux): exact, where sampling the RSS from a thread can miss a short peak."""

    def __init__(self) -> None:
        self.available = self.read() > 0
        if self.available:
            try:
                self.reset()
            except OSError:
                self.available = False

    def reset(self) -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def read(self) -> int:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        return 0


def _training_step(spec: dict[str, Any], device: Any) -> tuple[Callable[[], float], Callable[[], int], int]:
    """(step, bytes held between steps (counted), tokens per step): one step as ``trainer.train`` runs it, with the
    trainer's own objective and loss module (``DistillObjective`` / ``PretrainObjective``), AdamW and
    gradient clipping, under bf16 autocast on CUDA."""
    from contextlib import nullcontext

    import torch

    from ..checkpoints import load_tokenizer
    from ..data import training_sequences
    from ..training.distill import DistillObjective, DistillSettings, default_teacher
    from ..training.pretrain import PretrainObjective, PretrainSettings, initial_checkpoint
    from ..training.trainer import TrainingArgs

    ckpt, cuda = spec["checkpoint"], device.type == "cuda"
    targs = TrainingArgs(out=Path("unused"), steps=3, seq_len=spec["seq_len"], micro_batch=spec["micro_batch"])
    if spec["phase"] == "pretrain":
        model, tokenizer = initial_checkpoint(ckpt)
        objective = PretrainObjective(model, tokenizer, PretrainSettings(init_from=Path(ckpt)), Path("unused"))
        models = [model.to(device)]
    else:
        if not is_melt(load_config(ckpt)):
            raise InvalidArgumentError(
                f"phase {spec['phase']} trains a MELT student: convert {ckpt} first (melt convert)"
            )
        settings = DistillSettings(
            phase=int(spec["phase"]), chunk_size=spec["chunk_size"], checkpoint_chunks=spec["checkpoint_chunks"]
        )
        objective = DistillObjective(
            ckpt, default_teacher(ckpt), settings, steps=3, teacher_dtype="bf16" if cuda else "fp32"
        )
        objective.teacher.to(device).eval()
        models = [objective.student.to(device), objective.teacher]
        tokenizer = load_tokenizer(ckpt) if spec["data"] else None
    wrapped = objective.model.train()
    optimizer = torch.optim.AdamW(objective.param_groups(targs), betas=targs.betas, weight_decay=targs.weight_decay)
    B, S = spec["micro_batch"], spec["seq_len"]
    targets = None
    if spec["data"]:
        data = training_sequences(spec["data"], tokenizer, S, 0, spec["text_field"])
        rows = torch.arange(B) % len(data.sequences)
        ids = data.sequences[rows]
        targets = None if data.targets is None else data.targets[rows].to(device)
    else:
        vocab = models[0].config.vocab_size
        ids = torch.randint(3, vocab, (B, S), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def step() -> float:
        with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext():
            loss, _ = objective.loss(wrapped, ids, 1, targets)  # phase 1: alpha 0.5 (step 1 of 3)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, targs.clip)
        optimizer.step()
        optimizer.zero_grad()
        return float(loss.detach())

    def held() -> int:
        weights = sum(p.nbytes for m in models for p in m.parameters())
        states = sum(t.nbytes for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
        return weights + states

    return step, held, B * S
