"""Golden losses: a few training steps under a fixed init give recorded values (refactors must keep them)."""

from __future__ import annotations

import json

import pytest

from melt_core.checkpoints.convert import convert_ouro_to_melt
from melt_core.models.config import MeltSettings
from melt_core.training.distill import DataArgs, DistillSettings, run_phase
from melt_core.training.pretrain import PretrainSettings, run_pretrain
from melt_core.training.trainer import TrainingArgs

# Recorded on torch 2.13.0+cpu; the tolerance absorbs kernel-order noise, not a changed computation.
GOLDEN = {
    "phase1": [1.4020851146767654e-09, 0.0076773990876972675, 0.009810633026063442],
    "phase2": [0.059428561478853226, 0.16323977708816528, 0.14414963126182556],
    "pretrain": [5.715259075164795, 5.659301280975342, 5.564203262329102],
}


def _losses(run_dir) -> list[float]:
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m["loss"] for m in lines if "loss" in m]


def _args(out, **kw) -> TrainingArgs:
    return TrainingArgs(out=out, **{"steps": 3, "seq_len": 32, "batch_tokens": 64, "warmup_steps": 0, **kw})


@pytest.mark.parametrize("phase", [1, 2])
def test_distill_golden_losses(tiny_ckpt, text_file, tmp_path, phase):
    student = convert_ouro_to_melt(tiny_ckpt, tmp_path / "melt", MeltSettings(chunk_size=8, z0=0.3))
    result = run_phase(
        student,
        tiny_ckpt,
        DistillSettings(phase=phase),
        DataArgs(text_file),
        _args(tmp_path / "run", gate_lr=5e-2, lr=1e-3),
    )
    assert _losses(result.out) == pytest.approx(GOLDEN[f"phase{phase}"], rel=1e-4, abs=1e-7)


def test_pretrain_golden_losses(text_file, tmp_path):
    settings = PretrainSettings(preset="tiny", loops=2, vocab_size=300, objective="ramp")
    result = run_pretrain(settings, text_file, _args(tmp_path / "run", lr=3e-3, micro_batch=2, batch_tokens=None))
    assert _losses(result.out) == pytest.approx(GOLDEN["pretrain"], rel=1e-4, abs=1e-7)
