"""Evaluation: per-loop held-out loss and perplexity, and agreement with an Ouro teacher (``heldout``)."""

from .heldout import EvalReport, EvalSettings, LoopResult, evaluate_checkpoint, score_batch

__all__ = ["EvalReport", "EvalSettings", "LoopResult", "evaluate_checkpoint", "score_batch"]
