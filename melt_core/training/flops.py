"""Model FLOPs of a training token, and the model FLOPs utilisation (MFU) they give.

MFU = (model FLOPs per token x tokens per second) / (peak FLOP/s of the devices). Model FLOPs count
the matrix multiplications a step needs mathematically (the PaLM convention): the student's forward
and backward (backward = 2 x forward), and a frozen teacher's forward; recomputation by activation
checkpointing is work the hardware does on top, so it lowers MFU rather than counting in it.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..models.config import OuroConfig
from ..models.update_rules import KVGate

# Dense bf16/fp16 tensor-core peak of one device, TFLOP/s (vendor datasheets, without sparsity), by
# a pattern of torch.cuda.get_device_name(); the first match wins, so the more specific names come
# first. Anything else: pass --peak-tflops.
PEAK_TFLOPS_BF16: tuple[tuple[str, float], ...] = (
    (r"GH200", 989.0),
    (r"H200", 989.0),
    (r"H100.*PCIe", 756.0),
    (r"H100.*NVL", 835.0),
    (r"H100|H800", 989.0),
    (r"B200", 2250.0),
    (r"A100|A800", 312.0),
    (r"L40S", 362.0),
    (r"RTX 4090", 165.0),
)


def layer_forward_flops(config: OuroConfig, context: float, gate_width: int = 0) -> float:
    """FLOPs of one decoder layer's forward for one token that attends to ``context`` keys:

    - projections ``2 H (n_q d + 2 n_kv d)`` (q, k, v) ``+ 2 n_q d H`` (o);
    - SwiGLU MLP ``3 x 2 H I`` (gate, up, down);
    - attention ``2 x 2 n_q d x context`` (scores q k^T and the weighted sum of values);
    - a MELT KV gate of width w ``2 x 2 H w`` (``W_z u`` and ``U_z h``; 0 for Ouro).

    Norms, rotary embeddings, softmax and element-wise ops are left out (a few FLOPs per element,
    not per weight)."""
    h, i, d = config.hidden_size, config.intermediate_size, config.head_dim
    n_q, n_kv = config.num_attention_heads, config.num_key_value_heads
    projections = 2 * h * (n_q * d + 2 * n_kv * d) + 2 * n_q * d * h
    return projections + 3 * 2 * h * i + 2 * 2 * n_q * d * context + 2 * 2 * h * gate_width


def forward_flops_per_token(
    config: OuroConfig, seq_len: int, loops: int | None = None, head_passes: int = 1, gate_width: int = 0
) -> float:
    """FLOPs per token of one forward of the looped model over sequences of ``seq_len`` tokens:

        T x L x layer_forward_flops(context = (S + 1) / 2) + head_passes x 2 H V + T x 2 H

    with T = ``loops`` (default ``total_ut_steps``), L layers, a causal mask (a token attends to
    itself and the tokens before it: (S + 1) / 2 keys on average, at every loop: Ouro keeps one KV
    row per (loop, layer), MELT one per layer that every loop reads), ``head_passes`` products with
    the H x V ``lm_head`` (one per loop whose logits a loss needs), and the exit gate (H -> 1) at
    every loop."""
    t = config.total_ut_steps if loops is None else loops
    h, v = config.hidden_size, config.vocab_size
    context = (seq_len + 1) / 2
    stack = t * config.num_hidden_layers * layer_forward_flops(config, context, gate_width)
    return stack + head_passes * 2 * h * v + t * 2 * h


def training_flops_per_token(
    config: OuroConfig,
    seq_len: int,
    loops: int | None = None,
    head_passes: int = 1,
    gate_width: int = 0,
    teacher: OuroConfig | None = None,
    teacher_head_passes: int = 0,
) -> float:
    """Model FLOPs per training token: 3 x the student's forward (forward + backward, which costs
    two forwards: gradients of activations and of weights), plus the frozen ``teacher``'s forward
    (no backward) with ``teacher_head_passes`` products with its ``lm_head`` (the KD logits)."""
    student = 3 * forward_flops_per_token(config, seq_len, loops, head_passes, gate_width)
    if teacher is None:
        return student
    return student + forward_flops_per_token(teacher, seq_len, loops, teacher_head_passes)


def kv_gate_width(model: nn.Module) -> int:
    """The width of a MELT model's KV gates (H, or 1 for scalar gates); 0 without gates (Ouro)."""
    return next((m.input_proj.out_features for m in model.modules() if isinstance(m, KVGate)), 0)


def peak_flops_per_device(device: torch.device, mixed_precision: str, peak_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device: ``peak_tflops`` when given; else, for a CUDA GPU training in bf16
    or fp16, its dense tensor-core peak from ``PEAK_TFLOPS_BF16``; else None (MFU is not reported:
    a CPU's or an fp32 peak is not known well enough to guess)."""
    if peak_tflops is not None:
        return peak_tflops * 1e12
    if device.type != "cuda" or mixed_precision not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(device)
    for pattern, tflops in PEAK_TFLOPS_BF16:
        if re.search(pattern, name):
            return tflops * 1e12
    return None
