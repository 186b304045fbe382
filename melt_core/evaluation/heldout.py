"""Held-out evaluation per loop: loss and perplexity, and agreement with a teacher (``melt eval``)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoints import load_config, load_model, load_tokenizer
from ..data import PackedSequences
from ..errors import InvalidArgumentError, UnsupportedModelError
from ..models import is_ouro
from ..models.config import validate_loops
from ..runtime import resolve_device


@dataclass
class LoopStats:
    """Sums over predicted tokens at one loop; ``finish`` turns them into means."""

    nll: float = 0.0
    kl: float = 0.0
    agree: float = 0.0
    tokens: int = 0

    def add(self, nll: Tensor, kl: Tensor | None, agree: Tensor | None) -> None:
        self.nll += float(nll.sum())
        self.tokens += nll.numel()
        if kl is not None:
            self.kl += float(kl.sum())
            self.agree += float(agree.sum())


@torch.no_grad()
def score_batch(
    model: nn.Module,
    input_ids: Tensor,
    loops: int | None,
    teacher: nn.Module | None,
    stats: list[LoopStats] | None = None,
    targets: Tensor | None = None,
) -> list[LoopStats]:
    """Accumulate per-loop next-token NLL (and KL(teacher || model), top-1 agreement) of one batch;
    ``targets`` (B, S) bool: only the tokens it marks are predicted (None: all).

    Logits are computed one loop at a time from hidden states (MELT chunk-wise, with its chunk size).
    """
    hidden, _ = model.forward_hidden(input_ids, loops=loops)
    t_hidden = teacher.forward_hidden(input_ids, loops=loops)[0] if teacher is not None else None
    keep = targets[:, 1:] if targets is not None else torch.ones_like(input_ids[:, 1:], dtype=torch.bool)
    labels = input_ids[:, 1:][keep]
    stats = stats or [LoopStats() for _ in hidden]
    for t, h in enumerate(hidden):
        log_p = F.log_softmax(model.lm_head(h[:, :-1][keep]).float(), -1)  # (N, V)
        nll = -log_p.gather(-1, labels[..., None]).squeeze(-1)
        kl = agree = None
        if t_hidden is not None:
            log_q = F.log_softmax(teacher.lm_head(t_hidden[t][:, :-1][keep]).float(), -1)
            kl = (log_q.exp() * (log_q - log_p)).sum(-1)
            agree = (log_q.argmax(-1) == log_p.argmax(-1)).float()
        stats[t].add(nll, kl, agree)
    return stats


@dataclass
class LoopResult:
    loop: int
    loss: float
    perplexity: float
    kl_to_teacher: float | None = None
    top1_agreement: float | None = None


@dataclass
class EvalReport:
    checkpoint: str
    model_type: str
    data: str
    tokens: int
    sequences: int
    seq_len: int
    teacher: str | None
    results: dict[int, list[LoopResult]] = field(default_factory=dict)  # loop count -> per-loop results

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["results"] = {str(k): [asdict(r) for r in v] for k, v in self.results.items()}
        return d


def finish(stats: list[LoopStats], with_teacher: bool) -> list[LoopResult]:
    out = []
    for t, s in enumerate(stats, 1):
        loss = s.nll / s.tokens
        out.append(
            LoopResult(
                t,
                loss,
                math.exp(min(loss, 700.0)),
                s.kl / s.tokens if with_teacher else None,
                s.agree / s.tokens if with_teacher else None,
            )
        )
    return out


@dataclass
class EvalSettings:
    """How ``evaluate_checkpoint`` reads and runs: sequences of ``seq_len`` tokens, the first
    ``max_sequences`` of them (None: all), ``batch_size`` per forward, on ``device`` in ``dtype``."""

    seq_len: int = 512
    max_sequences: int | None = 64
    batch_size: int = 4
    text_field: str = "text"
    device: str = "auto"
    dtype: str | None = "auto"  # the checkpoint's own

    def __post_init__(self) -> None:
        if self.max_sequences is not None and self.max_sequences < 1:
            raise InvalidArgumentError(f"max-sequences must be >= 1 (or None for all), got {self.max_sequences}")
        if self.batch_size < 1:
            raise InvalidArgumentError(f"batch size must be >= 1, got {self.batch_size}")


def evaluate_checkpoint(
    path: str | os.PathLike,
    data: str | os.PathLike,
    settings: EvalSettings | None = None,
    *,
    teacher: str | os.PathLike | None = None,
    loops: list[int | None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> EvalReport:
    """Per-loop held-out loss/perplexity of a checkpoint on the first ``max_sequences`` packed
    sequences of ``data`` (in file order); with a teacher also KL(teacher || model) and top-1
    agreement per loop. ``loops``: the loop counts to run (None: the model's own)."""
    s = settings or EvalSettings()
    seq_len, max_sequences, batch_size, text_field, device, dtype = (
        s.seq_len,
        s.max_sequences,
        s.batch_size,
        s.text_field,
        s.device,
        s.dtype,
    )
    config = load_config(path)  # options are checked before any weight is read
    if seq_len > config.max_position_embeddings:
        raise InvalidArgumentError(
            f"--seq-len {seq_len} exceeds the model's maximum {config.max_position_embeddings} "
            "(max_position_embeddings)"
        )
    if seq_len < 2:
        raise InvalidArgumentError(f"--seq-len must be >= 2 (one token predicts the next), got {seq_len}")
    if teacher is not None and not is_ouro(load_config(teacher)):
        raise UnsupportedModelError(
            f"the teacher {teacher} is a {load_config(teacher).model_type} checkpoint; "
            "a teacher is an Ouro LoopLM (its per-loop logits are the reference)"
        )
    for count in loops or []:
        if count is not None:
            validate_loops(count)
    device = resolve_device(device)
    model = load_model(path, dtype=dtype, device=device)
    teacher_model = load_model(teacher, dtype=dtype, device=device) if teacher is not None else None
    if teacher_model is not None and teacher_model.config.vocab_size != model.config.vocab_size:
        raise InvalidArgumentError(
            f"teacher vocabulary {teacher_model.config.vocab_size} != model vocabulary {model.config.vocab_size}"
        )
    packed = PackedSequences.from_path(data, load_tokenizer(path), seq_len, text_field=text_field)
    sequences = packed.sequences[:max_sequences] if max_sequences else packed.sequences
    loops = loops or [None]
    report = EvalReport(
        str(path),
        model.config.model_type,
        str(data),
        sequences.numel(),
        len(sequences),
        seq_len,
        str(teacher) if teacher is not None else None,
    )
    total, done = len(loops) * len(sequences), 0
    for count in loops:
        stats = None
        for s in range(0, len(sequences), batch_size):
            batch = sequences[s : s + batch_size].to(device)
            stats = score_batch(model, batch, count, teacher_model, stats)
            done += len(batch)
            if progress:
                progress(done, total)
        report.results[count or model.config.total_ut_steps] = finish(stats, teacher_model is not None)
    return report
