"""Adaptive depth for MELT: a token leaves the loop once it is confident, and its remaining loops
are never computed.

In Ouro a later token's loop t attends to every earlier token's loop-t row, so every loop of every
token must run (the reference computes all T loops whatever its exit gate says). In MELT a later
token reads only earlier tokens' *final* rows: a token that exits at loop t keeps its loop-t row in
the shared cache, and nothing has to be filled in. Two criteria, either of which ends a token's loop:

- ``threshold``: Ouro's exit gate, the cumulative exit probability ``sum_{j<=t} p_j``
  (docs/ouro-format.md, "The exit gate and the returned logits"; in fp32) reaches the threshold;
- ``kl``: the next-token distribution has settled, ``KL(p_t || p_{t-1})`` below ``kl`` nats.

Compute is skipped per batch row: a loop runs only the rows that still have a looping token, so a
one-token decode step skips exactly the loops its token does not need. Within a row of a prefill
chunk, exited tokens are carried along (their state and rows are kept, not recomputed) until the
whole row has exited. ``ExitStats`` counts both: the loops each token used and those computed.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass, field

import torch
from torch import Tensor, nn

from ..errors import InvalidArgumentError
from .kv import SharedKV
from .layers import BlockInputs


@dataclass
class ExitStats:
    """Counters over every forward run with one ``AdaptiveDepth``.

    tokens / loops_used: real (non-padding) tokens and the loops they ran (exit loop + 1).
    positions_computed / positions_full: (batch row, position) x loop pairs computed, and what full
      depth computes (padding included): ``compute_saved`` is the fraction not computed.
    """

    tokens: int = 0
    loops_used: int = 0
    positions_computed: int = 0
    positions_full: int = 0

    @property
    def mean_loops(self) -> float:
        return self.loops_used / self.tokens if self.tokens else 0.0

    @property
    def compute_saved(self) -> float:
        return 1.0 - self.positions_computed / self.positions_full if self.positions_full else 0.0

    def minus(self, earlier: ExitStats) -> ExitStats:
        """What was counted since ``earlier`` (a copy taken before)."""
        return ExitStats(*(a - b for a, b in zip(astuple(self), astuple(earlier), strict=True)))

    def plus(self, other: ExitStats) -> ExitStats:
        return ExitStats(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))


@dataclass
class AdaptiveDepth:
    """When a MELT token stops looping: ``threshold`` (cumulative exit probability, in [0, 1]) and/or
    ``kl`` (nats, > 0); the first criterion met ends the token's loop. ``stats`` accumulates."""

    threshold: float | None = None
    kl: float | None = None
    stats: ExitStats = field(default_factory=ExitStats)

    def __post_init__(self) -> None:
        if self.threshold is None and self.kl is None:
            raise InvalidArgumentError("adaptive depth needs an exit threshold or an exit KL (or both)")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise InvalidArgumentError(f"exit-threshold must be in [0, 1], got {self.threshold}")
        if self.kl is not None and not self.kl > 0.0:
            raise InvalidArgumentError(f"exit-kl must be > 0 nats, got {self.kl}")


class ExitCriterion:
    """The per-token state of the criteria over one forward: (B, S) tensors, updated for the rows
    computed at each loop."""

    def __init__(self, depth: AdaptiveDepth, model: nn.Module, batch: int, length: int, device: torch.device) -> None:
        self.depth, self.model = depth, model
        self.cumulative = torch.zeros(batch, length, device=device)  # sum of exit probabilities so far
        self.remaining = torch.ones(batch, length, device=device)  # probability of not having exited
        self.log_probs: Tensor | None = None  # previous loop's next-token log-probabilities (kl)

    def exits(self, h: Tensor, rows: Tensor | None) -> Tensor:
        """(B_rows, S) bool: which tokens of the computed rows have h (this loop's output) confident."""
        exits = torch.zeros(h.shape[:2], dtype=torch.bool, device=h.device)
        if self.depth.threshold is not None:
            lam = torch.sigmoid(self.model.model.early_exit_gate(h).squeeze(-1).float())
            cumulative, remaining = _pick(self.cumulative, rows), _pick(self.remaining, rows)
            cumulative = cumulative + lam * remaining
            self.cumulative = _put(self.cumulative, rows, cumulative)
            self.remaining = _put(self.remaining, rows, remaining * (1.0 - lam))
            exits |= cumulative >= self.depth.threshold
        if self.depth.kl is not None:
            log_probs = torch.log_softmax(self.model.lm_head(h).float(), dim=-1)
            if self.log_probs is not None:
                previous = _pick(self.log_probs, rows)
                kl = (log_probs.exp() * (log_probs - previous)).sum(-1)
                exits |= kl < self.depth.kl
            self.log_probs = log_probs if self.log_probs is None else _put(self.log_probs, rows, log_probs)
        return exits


def adaptive_loop_stack(
    model: nn.Module, x: Tensor, inputs: BlockInputs, kv: SharedKV, loops: int, depth: AdaptiveDepth, real: Tensor
) -> list[Tensor]:
    """``loop_stack`` with early exit: the per-loop outputs T x (B, S, H), where a token that has
    exited keeps its exit loop's output (so the last entry is every token's final state).
    ``real`` (B, S): the real tokens; padding is carried along (never looping on its own account)
    and not counted; a row of padding only runs while other rows do, so that batch shapes stay
    those of full depth (at threshold 1.0 the result is then bit-identical)."""
    B, S, _ = x.shape
    criterion = ExitCriterion(depth, model, B, S, x.device)
    running = real.clone()  # tokens still looping
    padding_only = ~real.any(1)  # rows with no real token in this chunk run while any other row does
    exit_loop = torch.full((B, S), loops - 1, dtype=torch.long, device=x.device)
    rope, mask = inputs.rope, inputs.mask
    hidden: list[Tensor] = []
    computed = 0
    for loop in range(loops):
        rows = None
        if loop > 0:
            if not bool(running.any()):  # every token has exited: the remaining loops are skipped
                break
            active = running.any(1) | padding_only  # (padding-only rows: batch shapes as at full depth)
            if not bool(active.all()):
                rows = active.nonzero().squeeze(1)
        run = _pick(running, rows)
        inputs.loop = loop
        inputs.rope = rope if rows is None else (rope[0][rows], rope[1][rows])
        per_row = isinstance(mask, Tensor) and mask.shape[0] > 1  # a padding mask; a causal bias is shared
        inputs.mask = mask[rows] if rows is not None and per_row else mask
        kv.batch_rows, kv.keep = rows, (None if loop == 0 else ~run)
        before = _pick(x, rows)
        y = before
        for i, layer in enumerate(model.model.layers):
            y = layer(y, i, inputs)
        h = model.model.norm(y)
        if loop > 0:
            h = torch.where(run[..., None], h, before)  # exited tokens keep their exit loop's output
        x = _put(x, rows, h)
        hidden.append(x)
        computed += h.shape[0] * S
        if loop < loops - 1:
            leaving = criterion.exits(h, rows) & run
            exit_loop = _put(exit_loop, rows, torch.where(leaving, loop, _pick(exit_loop, rows)))
            running = _put(running, rows, run & ~leaving)
    kv.batch_rows = kv.keep = None
    inputs.rope, inputs.mask = rope, mask
    hidden += [x] * (loops - len(hidden))
    stats = depth.stats
    stats.tokens += int(real.sum())
    stats.loops_used += int((exit_loop + 1)[real].sum())
    stats.positions_computed += computed
    stats.positions_full += B * S * loops
    return hidden


def _pick(t: Tensor, rows: Tensor | None) -> Tensor:
    return t if rows is None else t[rows]


def _put(t: Tensor, rows: Tensor | None, value: Tensor) -> Tensor:
    """``t`` with ``value`` at ``rows`` (None: all of it), as a new tensor."""
    return value if rows is None else t.index_copy(0, rows, value)
