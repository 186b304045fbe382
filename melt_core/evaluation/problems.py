"""Accuracy on a problem file (``prompt`` / ``answer`` records), per loop, as the model decodes.

Each batch of prompts is left-padded and prefilled through a KV cache exactly as ``melt generate``
does (MELT: chunks aligned to the end of the prompt), then the answer's tokens are fed one at a
time as decode steps. A problem counts as solved at loop t when every answer token is the argmax of
loop t's logits: that is, when greedy generation exiting at loop t writes the answer first
(``melt generate --max-new-tokens`` the answer's length writes exactly it). ``loss`` is the mean
next-token NLL of the answer's tokens.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..cache.quantized import KVFormat
from ..checkpoints import load_model, load_tokenizer
from ..data import encode_problem, read_problems
from ..errors import InvalidArgumentError
from ..inference.engine import Engine, EngineOptions
from ..runtime import resolve_device
from .heldout import EvalReport

DEFAULT_BATCH = 64


@dataclass
class ProblemLoopResult:
    loop: int
    accuracy: float
    loss: float
    perplexity: float
    accuracy_by_hops: dict[str, float] | None = None  # when the records carry ``hops``


@dataclass
class _Counts:
    solved: list[bool] = field(default_factory=list)
    nll: float = 0.0
    tokens: int = 0


@torch.no_grad()
def answer_scores(
    model: nn.Module,
    pairs: list[tuple[list[int], list[int]]],
    loops: int | None,
    chunk_size: int | None = None,
    kv_dtype: str | KVFormat | None = None,
    decode: str = "auto",
) -> list[tuple[list[bool], list[float]]]:
    """Per (prompt ids, answer ids) pair of one batch, per loop: whether the answer is greedy, and
    its summed NLL. Prompts are left-padded; the answer is fed token by token through the cache
    (rows stored as ``kv_dtype``: ``cache.quantized.kv_format``), on the engine's ``decode`` path."""
    device = model.device
    B = len(pairs)
    S = max(len(p) for p, _ in pairs)
    A = max(len(a) for _, a in pairs)
    ids = torch.zeros(B, S, dtype=torch.long)
    mask = torch.zeros(B, S, dtype=torch.long)
    answers = torch.zeros(B, A, dtype=torch.long)
    for b, (prompt, answer) in enumerate(pairs):
        ids[b, S - len(prompt) :], mask[b, S - len(prompt) :] = torch.tensor(prompt), 1
        answers[b, : len(answer)] = torch.tensor(answer)
    ids, answers = ids.to(device), answers.to(device)
    mask_arg = None if bool(mask.all()) else mask.to(device)
    count = model.config.resolve_loops(loops)
    engine = Engine(model, EngineOptions(loops=count, chunk_size=chunk_size, kv_dtype=kv_dtype, decode=decode))
    cache = engine.new_cache(B, S + A)
    # per answer position, per loop (B, V) log-probabilities: the prefill of `melt generate`, then decode steps
    logits = engine.prefill(cache, ids, mask_arg, per_loop=True)
    steps = []
    for j in range(A):
        steps.append([F.log_softmax(lg.float(), -1) for lg in logits])
        if j + 1 < A:
            logits = engine.step(cache, answers[:, j : j + 1], per_loop=True)
    out = []
    for b, (_, answer) in enumerate(pairs):
        greedy, nll = [], []
        for t in range(count):
            logp = torch.stack([steps[j][t][b] for j in range(len(answer))])  # (len, V)
            target = answers[b, : len(answer)]
            greedy.append(bool((logp.argmax(-1) == target).all()))
            nll.append(-float(logp.gather(-1, target[:, None]).sum()))
        out.append((greedy, nll))
    return out


def evaluate_problems(
    path: str | os.PathLike,
    data: str | os.PathLike,
    *,
    loops: list[int | None] | None = None,
    limit: int | None = None,
    batch_size: int | None = None,
    chunk_size: int | None = None,
    device: str = "auto",
    dtype: str | None = "auto",
    kv_dtype: str | KVFormat | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> EvalReport:
    """Greedy-answer accuracy and answer loss per loop of a checkpoint on a problem file (its first
    ``limit`` problems); ``loops``: the loop counts to run (None: the model's own); ``kv_dtype``:
    how the cache stores rows (``cache.quantized.kv_format``; None: the model's dtype)."""
    if limit is not None and limit < 1:
        raise InvalidArgumentError(f"--limit must be >= 1, got {limit}")
    batch_size = DEFAULT_BATCH if batch_size is None else batch_size
    if batch_size < 1:
        raise InvalidArgumentError(f"batch size must be >= 1, got {batch_size}")
    problems = read_problems(data)[:limit]
    model = load_model(path, dtype=dtype, device=resolve_device(device))
    tokenizer = load_tokenizer(path)
    pairs = [encode_problem(tokenizer, p.prompt, p.answer) for p in problems]
    longest = max(len(p) + len(a) for p, a in pairs)
    if longest > model.config.max_position_embeddings:
        raise InvalidArgumentError(
            f"{data}: a problem has {longest} tokens; the model's maximum is {model.config.max_position_embeddings}"
        )
    hops = [p.fields.get("hops") for p in problems]
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]))  # similar lengths, little padding
    loops = loops or [None]
    report = EvalReport(
        str(path), model.config.model_type, str(data), sum(len(a) for _, a in pairs), len(pairs), longest, None
    )
    total, done = len(loops) * len(pairs), 0
    for count in loops:
        n = model.config.resolve_loops(count)
        counts = [_Counts(solved=[False] * len(pairs)) for _ in range(n)]
        for first in range(0, len(order), batch_size):
            rows = order[first : first + batch_size]
            for i, (greedy, nll) in zip(rows, answer_scores(model, [pairs[i] for i in rows], n, chunk_size, kv_dtype)):
                for t in range(n):
                    counts[t].solved[i] = greedy[t]
                    counts[t].nll += nll[t]
                    counts[t].tokens += len(pairs[i][1])
            done += len(rows)
            if progress:
                progress(done, total)
        report.results[n] = [_result(t + 1, c, hops) for t, c in enumerate(counts)]
    return report


def _result(loop: int, counts: _Counts, hops: list[object]) -> ProblemLoopResult:
    loss = counts.nll / counts.tokens
    by_hops = None
    if all(isinstance(h, int) for h in hops):
        by_hops = {}
        for k in sorted(set(hops)):
            solved = [s for s, h in zip(counts.solved, hops, strict=True) if h == k]
            by_hops[str(k)] = sum(solved) / len(solved)
    return ProblemLoopResult(loop, sum(counts.solved) / len(counts.solved), loss, math.exp(min(loss, 700.0)), by_hops)
