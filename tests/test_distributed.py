"""Launches of several processes on CPUs (gloo): DDP that trains like one process, accelerate's
FSDP2 with checkpoints that resume bit-exactly, launches that cannot work refused in one line; and
the model FLOPs behind the logged MFU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from cli_helpers import one_red_line
from safetensors.torch import load_file
from typer.testing import CliRunner

from melt_cli.app import app
from melt_cli.progress import format_step
from melt_core.checkpoints import load_config
from melt_core.models.config import OuroConfig
from melt_core.training.flops import forward_flops_per_token, peak_flops_per_device, training_flops_per_token

runner = CliRunner()
# A run small enough for two processes on two shared cores: 4 sequences of 32 tokens per step.
PRETRAIN = ["pretrain", "--preset", "tiny", "--loops", "2", "--vocab-size", "300", "--seq-len", "32"]
PRETRAIN += ["--micro-batch", "1", "--batch-tokens", "128", "--eval-every", "0"]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no"]
ACCELERATE += ["--dynamo_backend", "no", "--main_process_port", "0"]
# The weights of two runs that differ only in how the same sums are split over processes agree to
# float32 rounding (about 1e-7 here); a step of AdamW moves them by about the learning rate (2e-3).
SAME_RUN = 1e-5


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MELT_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    for name in ("ACCELERATE_USE_CPU", "ACCELERATE_USE_FSDP", "FSDP_VERSION", "MASTER_ADDR", "WORLD_SIZE"):
        env.pop(name, None)
    return env


def _launch(launcher: list[str], melt_args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([*launcher, "-m", "melt_cli", *melt_args], capture_output=True, text=True, env=_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _metrics(run) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process_run(text_file, tmp_path_factory):
    """The reference: the same 2 steps in one process (4 micro-batches accumulated per step)."""
    out = tmp_path_factory.mktemp("one") / "run"
    result = runner.invoke(app, [*PRETRAIN, "--data", str(text_file), "--out", str(out), "--steps", "2"])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a launch on a machine without GPUs")
def test_two_processes_train_like_one(one_process_run, text_file, tmp_path):
    """DDP equivalence: `accelerate launch --multi_gpu --num_processes 2` on a machine without GPUs
    (accelerate's multi-process launcher; its `--cpu` starts one process) trains on the CPUs without
    melt's --device, and 2 processes x 2 micro-batches give the weights of 1 process x 4."""
    out = tmp_path / "ddp"
    proc = _launch(
        [*ACCELERATE, "--multi_gpu", "--num_processes", "2"],
        [*PRETRAIN, "--data", str(text_file)]
        + [
            "--out",
            str(out),
            "--steps",
            "2",
        ],
    )
    assert proc.stderr.count("2 processes (MULTI_CPU) on cpu") == 1  # one header, from the main process
    assert json.loads((out / "run_config.json").read_text())["world_size"] == 2
    assert _max_difference(_weights(out), _weights(one_process_run)) < SAME_RUN
    one, two = _metrics(one_process_run), _metrics(out)
    assert [m["step"] for m in two] == [1, 2]
    for a, b in zip(one, two, strict=True):  # the loss and its parts are means over both processes
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["ce_loop1"] == pytest.approx(a["ce_loop1"], rel=1e-5)


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def fsdp_run(text_file, tmp_path_factory):
    """2 steps with --fsdp on 2 CPU processes, a checkpoint after each."""
    run = tmp_path_factory.mktemp("fsdp") / "run"
    args = [*PRETRAIN, "--data", str(text_file), "--fsdp", "--steps", "2", "--save-every", "1", "--keep-last", "0"]
    proc = _launch(TORCHRUN, [*args, "--out", str(run)])
    assert proc.stderr.count("2 processes (FSDP2) on cpu") == 1
    return run


def test_fsdp_trains_like_one_process(one_process_run, fsdp_run):
    """`--fsdp` with 2 CPU processes: accelerate's FSDP2 (each decoder layer its own unit) gives the
    weights of the one-process run; its checkpoints are the usual safetensors + JSON files (the full
    state, gathered to the main process), which any launch can resume."""
    assert _max_difference(_weights(fsdp_run), _weights(one_process_run)) < SAME_RUN
    assert sorted(p.name for p in (fsdp_run / "checkpoints" / "step-000001").iterdir()) == [
        "model.safetensors",
        "optimizer.json",
        "optimizer.safetensors",
        "rng-0.safetensors",
        "rng-1.safetensors",
        "run_state.json",
    ]
    assert json.loads((fsdp_run / "run_config.json").read_text())["fsdp"] is True


@pytest.mark.slow
def test_fsdp_resumes_bit_exactly(fsdp_run, text_file, tmp_path):
    """The FSDP run as it was after step 1, resumed (with --fsdp, read back from its run_config.json),
    ends bit-identical to the uninterrupted run: weights and optimizer state, sharded and gathered."""
    again = tmp_path / "again"
    shutil.copytree(fsdp_run, again)
    shutil.rmtree(again / "checkpoints" / "step-000002")
    (again / "model.safetensors").unlink()
    _launch(TORCHRUN, [*PRETRAIN, "--data", str(text_file), "--resume", str(again)])
    for name in ("model.safetensors", "optimizer.safetensors"):
        a = load_file(str(fsdp_run / "checkpoints" / "step-000002" / name))
        b = load_file(str(again / "checkpoints" / "step-000002" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    resumed = _weights(again)
    assert all(torch.equal(t, resumed[k]) for k, t in _weights(fsdp_run).items())


def test_launches_that_cannot_work_are_refused(melt_ckpt, text_file, tmp_path, monkeypatch):
    """accelerate's single-process launcher (`--cpu`, or no `--multi_gpu` on a machine without GPUs)
    starts one process whatever --num_processes says (it exports MASTER_ADDR for N > 1, and no
    WORLD_SIZE); --fsdp needs several processes; FSDP1 configs; a sharded teacher needs FSDP. All
    before anything is loaded."""
    args = [*PRETRAIN, "--data", str(text_file), "--steps", "1"]
    shard = ["transition", str(melt_ckpt), "--data", str(text_file), "--out", str(tmp_path / "e"), "--shard-teacher"]
    assert "add --fsdp" in one_red_line(runner.invoke(app, shard))
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    line = one_red_line(runner.invoke(app, [*args, "--out", str(tmp_path / "a")]))
    assert "started ONE process" in line and "torchrun --nproc_per_node N" in line
    monkeypatch.setenv("ACCELERATE_USE_CPU", "False")  # `accelerate launch --num_processes 2` without GPUs
    assert "started ONE process" in one_red_line(runner.invoke(app, [*args, "--out", str(tmp_path / "a")]))
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.delenv("MASTER_ADDR")  # `accelerate launch --cpu` of one process trains
    line = one_red_line(runner.invoke(app, [*args, "--out", str(tmp_path / "b"), "--fsdp"]))
    assert "FSDP shards the model over the processes" in line
    assert not (tmp_path / "b").exists()
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --use_fsdp` exports
    monkeypatch.setenv("FSDP_VERSION", "1")
    line = one_red_line(runner.invoke(app, [*args, "--out", str(tmp_path / "c")]))
    assert "FSDP version 1; melt trains with FSDP2" in line
    monkeypatch.setenv("FSDP_VERSION", "2")
    line = one_red_line(runner.invoke(app, [*args, "--out", str(tmp_path / "d")]))
    assert "FSDP shards the model over the processes" in line


# --- model FLOPs and MFU -------------------------------------------------------------------------
def test_flops_per_token_by_hand():
    """H 32, I 64, 2 layers, 4 heads of 8 (MHA), vocab 384, 3 loops, sequences of 8 tokens."""
    c = OuroConfig(
        vocab_size=384,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        total_ut_steps=3,
    )
    projections = 2 * 32 * (32 + 2 * 32) + 2 * 32 * 32  # q, k, v from H; o back to H: 8,192
    mlp = 3 * 2 * 32 * 64  # gate, up, down: 12,288
    attention = 2 * 2 * 32 * 4.5  # q k^T and p v over (8 + 1) / 2 keys on average: 576
    layer = projections + mlp + attention  # 21,056
    forward = 3 * 2 * layer + 3 * 2 * 32 * 384 + 3 * 2 * 32  # 3 loops x 2 layers, 3 heads, 3 exit gates
    assert forward == 200_256
    assert forward_flops_per_token(c, 8, head_passes=3) == forward
    assert training_flops_per_token(c, 8, head_passes=3) == 3 * forward
    # a MELT student with H-wide KV gates (2 x 2 H H per layer and loop) and an Ouro teacher
    student = forward + 3 * 2 * (2 * 2 * 32 * 32)
    assert training_flops_per_token(c, 8, head_passes=3, gate_width=32, teacher=c, teacher_head_passes=3) == (
        3 * student + forward
    )


def test_peak_flops_and_mfu_in_the_metrics(text_file, tmp_path):
    """No MFU on a CPU unless its peak is given; with --peak-tflops every step logs
    mfu = FLOPs/token x tokens/s / peak, and the progress line shows it."""
    assert peak_flops_per_device(torch.device("cpu"), "no") is None
    assert peak_flops_per_device(torch.device("cpu"), "no", 2.5) == 2.5e12
    out = tmp_path / "run"
    args = [*PRETRAIN, "--data", str(text_file), "--out", str(out), "--steps", "2", "--peak-tflops", "0.5"]
    assert runner.invoke(app, args).exit_code == 0
    per_token = training_flops_per_token(load_config(out), 32, head_passes=2)
    for m in _metrics(out):
        assert m["mfu"] == pytest.approx(per_token * m["tokens_per_s"] / 0.5e12, rel=1e-9)
    assert "MFU" in format_step(m) and "tok/s" in format_step(m)
    plain = [*PRETRAIN, "--data", str(text_file), "--out", str(tmp_path / "plain"), "--steps", "1"]
    assert runner.invoke(app, plain).exit_code == 0
    assert "mfu" not in _metrics(tmp_path / "plain")[0]


def test_a_micro_batch_is_one_forward_and_the_teacher_runs_without_grad(
    melt_ckpt, tiny_ckpt, text_file, tmp_path, monkeypatch
):
    """A micro-batch of 2 sequences is one (2, S) chunk-wise forward of the student and one (2, S)
    forward of the teacher, under no_grad; 4 sequences per step make 2 micro-batches."""
    from melt_core.models import MeltForCausalLM, OuroForCausalLM
    from melt_core.training.distill import DataArgs, DistillSettings, run_phase
    from melt_core.training.trainer import TrainingArgs

    calls = []
    student_forward, teacher_forward = MeltForCausalLM.forward_chunkwise, OuroForCausalLM.forward_hidden

    def student(self, input_ids, *a, **kw):
        calls.append(("student", tuple(input_ids.shape), torch.is_grad_enabled()))
        return student_forward(self, input_ids, *a, **kw)

    def teacher(self, input_ids, *a, **kw):
        calls.append(("teacher", tuple(input_ids.shape), torch.is_grad_enabled()))
        return teacher_forward(self, input_ids, *a, **kw)

    monkeypatch.setattr(MeltForCausalLM, "forward_chunkwise", student)
    monkeypatch.setattr(OuroForCausalLM, "forward_hidden", teacher)
    args = TrainingArgs(out=tmp_path / "run", steps=1, seq_len=32, micro_batch=2, batch_tokens=4 * 32)
    run_phase(melt_ckpt, tiny_ckpt, DistillSettings(phase=2), DataArgs(text_file), args)
    assert calls == [("teacher", (2, 32), False), ("student", (2, 32), True)] * 2


def test_the_launchers_cpu_choice_sets_the_teacher_dtype(monkeypatch):
    """`accelerate launch --cpu` on a machine with a GPU: an fp32 teacher and no bf16 autocast."""
    from melt_core.training.distill import default_teacher_dtype
    from melt_core.training.trainer import TrainingArgs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = TrainingArgs(out="run", steps=1)
    assert args.on_cuda and default_teacher_dtype(args) == "bf16"
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    assert not args.on_cuda and default_teacher_dtype(args) == "fp32"
