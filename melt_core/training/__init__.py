"""Training on accelerate: the shared loop (``trainer``: accumulation, schedules, checkpoints, exact
resume), chunked losses (``losses``), MELT's two post-training phases (``distill``) and LoopLM
pretraining (``pretrain``)."""

from .distill import DataArgs, DistillSettings, run_both_phases, run_phase
from .pretrain import PretrainSettings, run_pretrain
from .trainer import TrainingArgs, TrainResult, train

__all__ = [
    "DataArgs",
    "DistillSettings",
    "PretrainSettings",
    "TrainResult",
    "TrainingArgs",
    "run_both_phases",
    "run_phase",
    "run_pretrain",
    "train",
]
