"""Evaluation: per-loop held-out loss and perplexity, and agreement with an Ouro teacher (``heldout``);
per-loop accuracy on a problem file, as decoded (``problems``)."""

from .heldout import EvalReport, EvalSettings, LoopResult, evaluate_checkpoint, score_batch
from .problems import ProblemLoopResult, evaluate_problems

__all__ = [
    "EvalReport",
    "EvalSettings",
    "LoopResult",
    "ProblemLoopResult",
    "evaluate_checkpoint",
    "evaluate_problems",
    "score_batch",
]
