"""Profiling: analytic and measured memory (``memory``, ``measure``), Ouro vs MELT speed (``speed``),
and the Ouro/MELT pairing both use (``pairs``)."""

from .measure import MeasuredRun, measure_generation
from .memory import MemoryEntry, MemoryProfileArgs, MemoryReport, memory_profile
from .pairs import ModelPair, load_pair
from .speed import SpeedProfileArgs, SpeedReport, SpeedRow, speed_profile

__all__ = [
    "MeasuredRun",
    "MemoryEntry",
    "MemoryProfileArgs",
    "MemoryReport",
    "ModelPair",
    "SpeedProfileArgs",
    "SpeedReport",
    "SpeedRow",
    "load_pair",
    "measure_generation",
    "memory_profile",
    "speed_profile",
]
