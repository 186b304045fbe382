"""How the next token is chosen: greedy, or sampled through transformers' logits warpers with a
seeded ``torch.Generator`` (reproducible samples)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InvalidArgumentError

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 0..2**64 - 1


@dataclass
class SamplingSettings:
    """How the next token is chosen: ``temperature`` 0 is greedy (argmax); above 0, the logits go
    through transformers' temperature, top-k (0 = off) and top-p (1 = off) warpers, in that order,
    and the token is drawn from the softmax with a ``torch.Generator`` seeded by ``seed``."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and math.isfinite(self.top_p)):
            raise InvalidArgumentError(
                f"temperature and top-p must be finite numbers, got {self.temperature} and {self.top_p}"
            )
        if self.temperature < 0:
            raise InvalidArgumentError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise InvalidArgumentError(f"top-k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidArgumentError(f"top-p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.seed is not None and (isinstance(self.seed, bool) or not 0 <= self.seed <= MAX_SEED):
            raise InvalidArgumentError(f"seed must be in 0..{MAX_SEED}, got {self.seed}")
        if self.temperature == 0 and (self.top_k > 0 or self.top_p < 1.0):
            raise InvalidArgumentError("top-k / top-p apply to sampling: set a temperature > 0 (0 is greedy)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Picks the next token of every row from the last position's logits (B, V)."""

    def __init__(self, settings: SamplingSettings, device: torch.device | str = "cpu") -> None:
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.settings = settings
        self.warpers = LogitsProcessorList()
        if not settings.greedy:
            if settings.temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(settings.temperature))
            if settings.top_k > 0:
                self.warpers.append(TopKLogitsWarper(settings.top_k))
            if settings.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(settings.top_p))
        self.generator = torch.Generator(device=device)
        if settings.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(settings.seed)

    def __call__(self, logits: Tensor, input_ids: Tensor) -> Tensor:
        """``logits`` (B, V), ``input_ids`` (B, S) the prompt (the warpers used ignore it) -> (B,)."""
        if self.settings.greedy:
            return logits.argmax(-1)
        scores = self.warpers(input_ids, logits.float())
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)
