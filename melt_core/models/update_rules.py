"""How a MELT token's latent state h moves from loop to loop: one small class per rule.

The rules and their parameters are described in docs/melt-method.md ("Update rules").

Every rule computes ``h = z * h_prev + (1 - z) * u`` with its own z: the learned element-wise gate
(``gate``, MELT itself), a learned scalar gate (``scalar``), or a training-free z (``last``: 0, ``first``: 1,
``mean``: a running mean over loops, ``ema``: a constant). A rule with a learned gate owns its
parameters: ``make_gate`` builds the per-layer ``KVGate`` module (``model.layers.{i}.kv_gate``),
and ``gate_width`` is the only place that decides its width.

This module depends on torch alone, so that the config can validate a policy name against
``UPDATE_RULES`` without importing the model code.
"""

from __future__ import annotations

import math
from typing import ClassVar, Protocol

import torch
from torch import Tensor, nn

from ..dtypes import upcast

GATE_MODULE = "kv_gate"  # a rule's parameters live at model.layers.{i}.kv_gate.*


def is_gate_parameter(name: str) -> bool:
    """Whether a parameter (state-dict) name belongs to a KV gate."""
    return f".{GATE_MODULE}." in name


class RuleSettings(Protocol):
    """What the rules read of ``MeltSettings`` (which validates its policy against ``UPDATE_RULES``)."""

    h0: str
    ema_factor: float


class KVGate(nn.Module):
    """``z = sigmoid(u @ W_z + h_prev @ U_z + b_z)``: element-wise (width H) or scalar (width 1).

    The pre-activation, the sigmoid and the mixing run in fp32 whatever the model dtype: in bf16
    a sigmoid above ~0.996 rounds to exactly 1 and ``1 - z`` loses most of its digits.
    """

    def __init__(self, hidden_size: int, width: int) -> None:
        super().__init__()
        self.input_proj = nn.Linear(hidden_size, width, bias=False)  # W_z, applied to u
        self.state_proj = nn.Linear(hidden_size, width, bias=False)  # U_z, applied to h_prev
        self.bias = nn.Parameter(torch.zeros(width))  # b_z

    def reset(self, z0: float) -> None:
        """W_z = U_z = 0, b_z = logit(z0): the untrained gate keeps a fraction z0 of h_prev."""
        with torch.no_grad():
            self.input_proj.weight.zero_()
            self.state_proj.weight.zero_()
            self.bias.fill_(math.log(z0 / (1.0 - z0)))

    def forward(self, u: Tensor, h_prev: Tensor) -> Tensor:
        """z in fp32, (..., width)."""
        return torch.sigmoid(upcast(self.input_proj(u)) + upcast(self.state_proj(h_prev)) + upcast(self.bias))


def mix(z: Tensor | float, h_prev: Tensor, u: Tensor) -> Tensor:
    """``z * h_prev + (1 - z) * u`` in fp32, cast back to u's dtype."""
    return (z * upcast(h_prev) + (1.0 - z) * upcast(u)).to(u.dtype)


class UpdateRule:
    """The latent state after each loop of one token and layer. ``loop`` is 0-based; ``gate`` is the
    layer's ``KVGate`` (None for training-free rules)."""

    name: ClassVar[str]
    gate_width: ClassVar[str | None] = None  # "hidden" (width H), "scalar" (width 1) or None: no parameters

    def __init__(self, settings: RuleSettings) -> None:
        self.settings = settings

    @classmethod
    def learned(cls) -> bool:
        return cls.gate_width is not None

    @classmethod
    def make_gate(cls, hidden_size: int) -> KVGate | None:
        """The per-layer parameters of this rule (None: it has none)."""
        if cls.gate_width is None:
            return None
        return KVGate(hidden_size, hidden_size if cls.gate_width == "hidden" else 1)

    def first(self, u: Tensor, gate: KVGate | None) -> Tensor:
        """h after loop 1: u itself, so loop 1 writes exactly Ouro's loop-1 row."""
        return u

    def next(self, loop: int, u: Tensor, h_prev: Tensor, gate: KVGate | None) -> Tensor:
        raise NotImplementedError


class LearnedGate(UpdateRule):
    def first(self, u: Tensor, gate: KVGate | None) -> Tensor:
        if self.settings.h0 == "zeros":  # h_prev = 0 before loop 1
            zeros = torch.zeros_like(u)
            return mix(gate(u, zeros), zeros, u)
        return u

    def next(self, loop: int, u: Tensor, h_prev: Tensor, gate: KVGate | None) -> Tensor:
        return mix(gate(u, h_prev), h_prev, u)


class ElementwiseGate(LearnedGate):
    """MELT: a learned gate value per hidden unit."""

    name = "gate"
    gate_width = "hidden"


class ScalarGate(LearnedGate):
    """The paper's ablation: one learned gate value per layer and token."""

    name = "scalar"
    gate_width = "scalar"


class Last(UpdateRule):
    """z = 0: the row is the latest loop's k/v."""

    name = "last"

    def next(self, loop: int, u: Tensor, h_prev: Tensor, gate: KVGate | None) -> Tensor:
        return u


class First(UpdateRule):
    """z = 1: the row stays the first loop's k/v (Ouro's "first-step" KV sharing)."""

    name = "first"

    def next(self, loop: int, u: Tensor, h_prev: Tensor, gate: KVGate | None) -> Tensor:
        return h_prev


class Mean(UpdateRule):
    """The running mean over loops 1..loop+1 of Ouro's per-loop k/v inputs."""

    name = "mean"

    def next(self, loop: int, u: Tensor, h_prev: Tensor, gate: KVGate | None) -> Tensor:
        return mix(loop / (loop + 1), h_prev, u)


class Ema(UpdateRule):
    """An EMA over loops: the newest loop weighs ``ema_factor``."""

    name = "ema"

    def next(self, loop: int, u: Tensor, h_prev: Tensor, gate: KVGate | None) -> Tensor:
        return mix(1.0 - self.settings.ema_factor, h_prev, u)


UPDATE_RULES: dict[str, type[UpdateRule]] = {
    rule.name: rule for rule in (ElementwiseGate, ScalarGate, Last, First, Mean, Ema)
}
