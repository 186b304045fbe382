"""Inference: the engine (``engine``: the one cached prefill + decode loop, its decode paths), the
fixed-shape step (``static_decode``), token choice (``sampling``), prompts and streamed text
(``text``), and whole-request text generation with statistics (``generate``)."""

from .generate import GenerateArgs, GenerationReport, GenerationResult, GenerationSettings, generate_text, run_generate
from .sampling import Sampler, SamplingSettings

__all__ = [
    "GenerateArgs",
    "GenerationReport",
    "GenerationResult",
    "GenerationSettings",
    "Sampler",
    "SamplingSettings",
    "generate_text",
    "run_generate",
]
