"""Golden losses: a few training steps under a fixed init give recorded values (refactors must keep them).

The runs are in float64. In float32 the first phase-1 step is ill-conditioned: at alpha = 0 the
student equals the teacher, so its gradient is rounding noise, which AdamW's first step scales up
to learning-rate-sized moves whose direction depends on the CPU's kernels (AVX2 vs AVX-512 gave
0.0077 vs 0.0073 at step 2). In float64 that noise is ~1e-16 and AdamW's eps absorbs it, so the
recorded values hold on any x86 CPU with AVX2 or AVX-512 to far tighter than the tolerance below.

Recorded on torch 2.13.0+cpu on an Intel Xeon (AVX-512 + AMX) and checked there with
ATEN_CPU_CAPABILITY=avx2 and =avx512, with 1 and 2 threads. (Without SIMD, ATEN_CPU_CAPABILITY=default,
torch draws different random weights for the test checkpoints: no x86 CI machine runs that way.)
"""

from __future__ import annotations

import json

import pytest

import melt_core.training.distill as distill
import melt_core.training.pretrain as pretrain
from melt_core.checkpoints.convert import convert_ouro_to_melt
from melt_core.models.config import MeltSettings
from melt_core.training.distill import DataArgs, DistillSettings, run_phase
from melt_core.training.pretrain import PretrainSettings, run_pretrain
from melt_core.training.trainer import TrainingArgs

GOLDEN = {
    "phase1": [0.0, 0.00738729829457937, 0.011053406806499608],
    "phase2": [0.059428577517466434, 0.16323973326606644, 0.14414970633741575],
    "pretrain": [5.7152585802629865, 5.659302822148847, 5.5642062668798635],
}
# AVX2 and AVX-512 kernels agreed to 1.2e-10 (relative); a changed computation moves these by >1e-4.
TOLERANCE = dict(rel=1e-7, abs=1e-12)


@pytest.fixture
def float64(monkeypatch):
    """Train in float64: models load (distillation) or are initialised (pretraining) as float64."""
    load_model = distill.load_model
    monkeypatch.setattr(distill, "load_model", lambda path, dtype=None, **kw: load_model(path, dtype, **kw).double())
    init_weights = pretrain.init_weights

    def init_float64(model, seed):
        init_weights(model, seed)
        model.double()

    monkeypatch.setattr(pretrain, "init_weights", init_float64)


def _losses(run_dir) -> list[float]:
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m["loss"] for m in lines if "loss" in m]


def _args(out, **kw) -> TrainingArgs:
    return TrainingArgs(out=out, **{"steps": 3, "seq_len": 32, "batch_tokens": 64, "warmup_steps": 0, **kw})


@pytest.mark.parametrize("phase", [1, 2])
def test_distill_golden_losses(tiny_ckpt, text_file, tmp_path, phase, float64):
    student = convert_ouro_to_melt(tiny_ckpt, tmp_path / "melt", MeltSettings(chunk_size=8, z0=0.3))
    result = run_phase(
        student,
        tiny_ckpt,
        DistillSettings(phase=phase),
        DataArgs(text_file),
        _args(tmp_path / "run", gate_lr=5e-2, lr=1e-3),
    )
    assert _losses(result.out) == pytest.approx(GOLDEN[f"phase{phase}"], **TOLERANCE)


def test_pretrain_golden_losses(text_file, tmp_path, float64):
    settings = PretrainSettings(preset="tiny", loops=2, vocab_size=300, objective="ramp")
    result = run_pretrain(settings, text_file, _args(tmp_path / "run", lr=3e-3, micro_batch=2, batch_tokens=None))
    assert _losses(result.out) == pytest.approx(GOLDEN["pretrain"], **TOLERANCE)
