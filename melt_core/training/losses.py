"""Training losses computed from hidden states, token chunk by token chunk.

Logits are never materialised for a whole batch: a (B*S, V) fp32 logits tensor per loop would
dominate memory for real vocabularies (49,152). Each chunk's logits are computed inside an
activation checkpoint, so only the hidden states are kept for the backward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..dtypes import upcast

TOKEN_CHUNK = 2048


def _kl_sum(h_student: Tensor, h_teacher: Tensor, w_student: Tensor, w_teacher: Tensor) -> Tensor:
    """Sum over tokens of KL(teacher || student) at temperature 1."""
    log_s = upcast(F.linear(h_student, w_student)).log_softmax(-1)
    with torch.no_grad():
        log_t = upcast(F.linear(h_teacher, w_teacher)).log_softmax(-1)
    return (log_t.exp() * (log_t - log_s)).sum()


def _ce_sum(h: Tensor, w: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(upcast(F.linear(h, w)), labels, reduction="sum")


def _chunked(fn, tensors: list[Tensor], token_chunk: int) -> Tensor:
    """``fn`` over token chunks of the flattened (N, ...) tensors, summed; checkpointed with grad."""
    n = tensors[0].shape[0]
    total = tensors[0].new_zeros((), dtype=torch.promote_types(tensors[0].dtype, torch.float32))
    for s in range(0, n, token_chunk):
        parts = [t[s : s + token_chunk] for t in tensors]
        chunk = checkpoint(fn, *parts, use_reentrant=False) if torch.is_grad_enabled() else fn(*parts)
        total = total + chunk
    return total


def predicting(targets: Tensor) -> Tensor:
    """(B, S) bool: the positions whose next token is a target (``targets`` shifted left by one)."""
    return F.pad(targets[:, 1:], (0, 1), value=False)


def kl_divergence(
    h_student: Tensor,
    h_teacher: Tensor,
    w_student: Tensor,
    w_teacher: Tensor,
    positions: Tensor | None = None,
    token_chunk: int = TOKEN_CHUNK,
) -> Tensor:
    """Mean over tokens of KL(teacher || student) between ``lm_head`` outputs of (B, S, H) states;
    ``positions`` (B, S) bool: only those tokens (None: all)."""
    H = h_student.shape[-1]
    hs, ht = h_student.reshape(-1, H), h_teacher.reshape(-1, H)
    if positions is not None:
        keep = positions.reshape(-1)
        hs, ht = hs[keep], ht[keep]
    fn = lambda a, b: _kl_sum(a, b, w_student, w_teacher)
    return _chunked(fn, [hs, ht], token_chunk) / max(hs.shape[0], 1)


def next_token_cross_entropy(
    h: Tensor, w: Tensor, input_ids: Tensor, targets: Tensor | None = None, token_chunk: int = TOKEN_CHUNK
) -> Tensor:
    """Mean next-token cross-entropy of ``lm_head(h)`` (B, S, H) predicting ``input_ids`` shifted by one;
    ``targets`` (B, S) bool: only the tokens it marks are predicted (None: all)."""
    H = h.shape[-1]
    hs = h[:, :-1].reshape(-1, H)
    labels = input_ids[:, 1:].reshape(-1)
    if targets is not None:
        keep = targets[:, 1:].reshape(-1)
        hs, labels = hs[keep], labels[keep]
    fn = lambda a, y: _ce_sum(a, w, y)
    return _chunked(fn, [hs, labels], token_chunk) / max(hs.shape[0], 1)


def per_token_cross_entropy(h: Tensor, w: Tensor, input_ids: Tensor, token_chunk: int = TOKEN_CHUNK) -> Tensor:
    """Next-token cross-entropy of every position but the last, (B, S - 1), chunked and checkpointed."""
    B, S, H = h.shape
    hs, labels = h[:, :-1].reshape(-1, H), input_ids[:, 1:].reshape(-1)
    fn = lambda a, y: F.cross_entropy(upcast(F.linear(a, w)), y, reduction="none")
    parts = []
    for s in range(0, hs.shape[0], token_chunk):
        a, y = hs[s : s + token_chunk], labels[s : s + token_chunk]
        parts.append(checkpoint(fn, a, y, use_reentrant=False) if torch.is_grad_enabled() else fn(a, y))
    return torch.cat(parts).view(B, S - 1)


def attention_alignment(student_taps: list[Tensor], teacher_taps: list[Tensor]) -> Tensor:
    """Mean over (layer, loop) of the MSE (averaged over tokens and hidden units) between student and
    stop-gradient teacher attention sub-block outputs."""
    if len(student_taps) != len(teacher_taps):
        raise ValueError(f"{len(student_taps)} student taps vs {len(teacher_taps)} teacher taps")
    losses = [_checkpointed(_mse, s, t.detach()) for s, t in zip(student_taps, teacher_taps, strict=True)]
    return torch.stack(losses).mean()


def _mse(s: Tensor, t: Tensor) -> Tensor:
    return F.mse_loss(upcast(s), upcast(t))


def _checkpointed(fn, *tensors: Tensor) -> Tensor:
    """``fn(*tensors)``; checkpointed when an input is upcast (a bf16 teacher's taps on CUDA): the
    backward then keeps the bf16 input, not a full-size fp32 copy of it."""
    if torch.is_grad_enabled() and any(t.dtype != torch.promote_types(t.dtype, torch.float32) for t in tensors):
        return checkpoint(fn, *tensors, use_reentrant=False)
    return fn(*tensors)
