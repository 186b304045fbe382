"""``melt profile training``: the planned memory of a training step, and a measured step against it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from melt_cli.app import app
from melt_core.errors import InvalidArgumentError
from melt_core.profiling.training import TrainingPlanArgs, training_plan

runner = CliRunner()
PAPER = dict(preset="ouro-1.4b", seq_len=10000, chunk_size=500)  # the MELT paper's recipe


def plan(**kw):
    return training_plan(TrainingPlanArgs(**kw))


@pytest.mark.parametrize("phase", ["1", "2"])
def test_paper_recipe_fits_80gb_per_gpu_with_fsdp_over_8(phase):
    one = plan(phase=phase, **PAPER)
    eight = plan(phase=phase, world_size=8, **PAPER)
    assert eight.fsdp and not one.fsdp
    assert eight.peak_bytes_per_gpu <= 80e9 < one.peak_bytes_per_gpu + 80e9
    assert eight.peak_bytes_per_gpu < one.peak_bytes_per_gpu
    # FSDP shards the fp32 master weights, their gradients and AdamW's two moments over the 8 GPUs
    assert eight.held_between_steps_bytes - eight.teacher_bytes < one.held_between_steps_bytes / 7
    assert one.parameters == eight.parameters > 1.6e9 and one.teacher_parameters < one.parameters


def test_breakdown_sums_to_the_peak_and_the_json_has_it():
    result = runner.invoke(
        app, ["profile", "training", "--preset", "ouro-1.4b", "--phase", "2", "--seq-len", "4096", "--json"]
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["peak_bytes_per_gpu"] == sum(out["breakdown"].values()) == max(out["moments"].values())
    assert out["moments"][out["peak_at"]] == out["peak_bytes_per_gpu"]
    assert out["chunk_size"] == 500 and out["flops_per_token"] > 1e10  # the config's chunk; ~60 GFLOP a token
    text = runner.invoke(app, ["profile", "training", "--preset", "melt-1.6b", "--phase", "1", "--world-size", "8"])
    assert text.exit_code == 0 and "peak per GPU" in text.output and "FSDP" in text.output


def test_checkpointed_chunks_keep_memory_linear_in_the_sequence():
    def acts(seq_len, ck):
        return plan(preset="ouro-1.4b", phase="1", seq_len=seq_len, chunk_size=500, checkpoint_chunks=ck)

    def growth(ck):  # how much more the next 8,000 tokens add than the 4,000 before them
        a = [acts(n, ck).activations_bytes for n in (4000, 8000, 16000)]
        return (a[2] - a[1]) / (a[1] - a[0])

    assert 1.9 < growth(True) < 2.1  # rows and their gradients: O(S); one chunk recomputed at a time
    assert growth(False) > 2.4  # every chunk's keys and values: O(S^2 / C) on top
    assert acts(8000, False).peak_bytes_per_gpu > 2 * acts(8000, True).peak_bytes_per_gpu


def test_bad_arguments_are_one_line(tmp_path):
    with pytest.raises(InvalidArgumentError, match="exactly one"):
        TrainingPlanArgs()
    with pytest.raises(InvalidArgumentError, match="phase"):
        TrainingPlanArgs(preset="ouro-1.4b", phase="3")
    with pytest.raises(InvalidArgumentError, match="needs a checkpoint"):
        TrainingPlanArgs(preset="ouro-1.4b", measure=True)
    with pytest.raises(InvalidArgumentError, match="world-size"):
        TrainingPlanArgs(preset="ouro-1.4b", fsdp=True)
    with pytest.raises(InvalidArgumentError, match="max_position_embeddings"):
        plan(preset="ouro-1.4b", seq_len=100_000)
    result = runner.invoke(app, ["profile", "training", "--preset", "ouro-1.4b", "--seq-len", "0"])
    assert result.exit_code != 0 and "--seq-len must be >= 2" in result.output


@pytest.fixture(scope="module")
def small_melt(tmp_path_factory, tokenizer) -> Path:
    """A MELT model large enough that its activations, not the interpreter, fill a step (hidden 128)."""
    from melt_core.checkpoints import convert_ouro_to_melt
    from melt_core.checkpoints.random_model import write_random_ouro
    from melt_core.models import MeltSettings

    root = tmp_path_factory.mktemp("plan")
    shape = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=2)
    ouro = write_random_ouro(
        root / "ouro",
        tokenizer=tokenizer,
        num_key_value_heads=2,
        total_ut_steps=4,
        max_position_embeddings=4096,
        **shape,
    )
    return convert_ouro_to_melt(ouro, root / "melt", MeltSettings(chunk_size=64))


def _check_measured(checkpoint: Path, **kw) -> None:
    result = plan(checkpoint=checkpoint, device="cpu", measure=True, **kw)
    m = result.measured
    assert m is not None and m.memory_kind in ("process_rss_high_water", "process_rss")
    ratio = m.step_peak_bytes / result.step_bytes
    print(
        f"{kw}: planned {result.step_bytes / 2**20:.1f} MiB, measured {m.step_peak_bytes / 2**20:.1f} MiB ({ratio:.3f})"
    )
    assert 0.85 <= ratio <= 1.15, (result.step_bytes, m.step_peak_bytes)
    assert m.measured_peak_bytes == m.held_bytes + m.step_peak_bytes and m.loss > 0


def test_measured_step_is_within_15_percent_of_the_plan(small_melt):
    _check_measured(small_melt, phase="2", seq_len=512, chunk_size=64, checkpoint_chunks=False)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kw",
    [
        dict(phase="1", seq_len=1024, chunk_size=64, micro_batch=2),
        dict(phase="2", seq_len=2048, chunk_size=128),
        dict(phase="2", seq_len=1024, chunk_size=64, checkpoint_chunks=False),
        dict(phase="1", seq_len=1024, chunk_size=64, checkpoint_chunks=False),
        dict(phase="pretrain", seq_len=1024),
    ],
)
def test_measured_steps_are_within_15_percent_of_the_plan(small_melt, kw):
    checkpoint = small_melt.parent / "ouro" if kw["phase"] == "pretrain" else small_melt
    _check_measured(checkpoint, **kw)
