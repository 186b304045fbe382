"""Phase 1 and phase 2 training on a tiny model: losses, schedule, resume, failures, 2 processes."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from cli_helpers import one_red_line
from typer.testing import CliRunner

from melt_cli.app import app
from melt_core import load_model
from melt_core.checkpoints.random_model import write_random_ouro
from melt_core.checkpoints.tokenizer import load_tokenizer
from melt_core.data import PackedSequences
from melt_core.errors import InvalidArgumentError, UnsupportedModelError
from melt_core.training.distill import DataArgs, DistillObjective, DistillSettings, run_phase
from melt_core.training.trainer import (
    TrainingArgs,
    TrainingDivergedError,
    TrainingInterruptedError,
    checkpoint_is_finite,
)

runner = CliRunner()
SEQ = 32


def _args(out, steps=4, **kw):
    kw = {"seq_len": SEQ, "batch_tokens": 2 * SEQ, "gate_lr": 1e-2, "lr": 1e-5, "warmup_steps": 0, **kw}
    return TrainingArgs(out=out, steps=steps, **kw)


def _metrics(run_dir):
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if "loss" in m]


def _fixed_batch_loss(student_path, teacher_path, phase, data):
    obj = DistillObjective(student_path, teacher_path, DistillSettings(phase=phase), steps=1)
    with torch.no_grad():
        loss, _ = obj.loss(obj.model, data.sequences[:4], step=0)
    return loss.item()


@pytest.mark.parametrize("phase", [1, 2])
def test_phases_train_and_lower_the_loss(melt_ckpt, tiny_ckpt, text_file, tmp_path, phase):
    data = PackedSequences.from_path(text_file, load_tokenizer(melt_ckpt), SEQ)
    before = _fixed_batch_loss(melt_ckpt, tiny_ckpt, phase, data)
    result = run_phase(
        melt_ckpt,
        None,
        DistillSettings(phase=phase),
        DataArgs(text_file, eval_data=text_file),
        _args(tmp_path / "run", steps=8, eval_batches=2),
    )
    metrics = _metrics(result.out)
    assert len(metrics) == 8 and all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    after = _fixed_batch_loss(result.out, tiny_ckpt, phase, data)
    assert after < before, (before, after)
    # the output is a loadable MELT checkpoint, and the run evaluated per loop
    assert type(load_model(result.out)).__name__ == "MeltForCausalLM"
    assert {"loss_loop1", "kl_loop4"} <= result.eval_metrics.keys()
    assert {"kd", "alpha", "lr_gate", "lr_base", "tokens_per_s", "peak_memory_bytes"} <= metrics[0].keys()
    assert ("align" in metrics[0]) == (phase == 2)


def test_alpha_schedule_and_zero_kl_at_start(melt_ckpt, tiny_ckpt, text_file, tmp_path):
    result = run_phase(melt_ckpt, tiny_ckpt, DistillSettings(phase=1), DataArgs(text_file), _args(tmp_path / "r", 5))
    metrics = _metrics(result.out)
    assert [m["alpha"] for m in metrics] == [0.0, 0.25, 0.5, 0.75, 1.0]
    # at alpha = 0 the student IS the teacher: KL ~ 0 on the first step
    assert metrics[0]["kd"] < 1e-6
    obj = DistillObjective(melt_ckpt, tiny_ckpt, DistillSettings(phase=2), steps=5)
    assert obj.alpha(0) == 1.0


def test_phase2_loss_is_kd_plus_beta_alignment_by_hand(melt_ckpt, tiny_ckpt, text_file):
    beta = 0.37
    obj = DistillObjective(melt_ckpt, tiny_ckpt, DistillSettings(phase=2, beta=beta), steps=1)
    with torch.no_grad():
        for p in obj.student.gate_parameters():  # move away from the (near-teacher) init
            p.add_(torch.randn_like(p) * 0.3)
    ids = PackedSequences.from_path(text_file, load_tokenizer(melt_ckpt), 16).sequences[:2]
    loss, parts = obj.loss(obj.model, ids, step=0)
    s = obj.student(ids, return_loop_logits=True, return_attn_outputs=True)
    t = obj.teacher(ids, return_loop_logits=True, return_attn_outputs=True)
    kd = torch.stack(
        [
            (F.softmax(tl, -1) * (F.log_softmax(tl, -1) - F.log_softmax(sl, -1))).sum(-1).mean()
            for sl, tl in zip(s.loop_logits, t.loop_logits)
        ]
    ).mean()
    align = torch.stack([((a - b) ** 2).mean() for a, b in zip(s.attn_outputs, t.attn_outputs)]).mean()
    torch.testing.assert_close(loss, kd + beta * align, atol=1e-6, rtol=1e-5)
    assert parts["kd"] == pytest.approx(kd.item(), rel=1e-5) and parts["align"] == pytest.approx(align.item(), rel=1e-5)


def test_resume_is_exact(melt_ckpt, tiny_ckpt, text_file, tmp_path):
    straight = run_phase(melt_ckpt, tiny_ckpt, DistillSettings(phase=1), DataArgs(text_file), _args(tmp_path / "a"))
    half = _args(tmp_path / "b", save_every=2)

    def stop(m):
        if m["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterruptedError, match="--resume"):
        run_phase(melt_ckpt, tiny_ckpt, DistillSettings(phase=1), DataArgs(text_file), half, on_step=stop)
    assert not (tmp_path / "b" / "config.json").exists()  # no final model from an interrupted run
    resumed = run_phase(
        melt_ckpt,
        tiny_ckpt,
        DistillSettings(phase=1),
        DataArgs(text_file),
        _args(tmp_path / "b", save_every=2, resume=tmp_path / "b"),
    )
    a, b = _metrics(straight.out), _metrics(resumed.out)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for ma, mb in zip(a, b):
        assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-6, abs=1e-9), (ma, mb)
    wa, wb = load_model(straight.out).state_dict(), load_model(resumed.out).state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("where", ["between micro-batches", "at a step boundary"])
def test_resume_after_any_interrupt_is_bit_exact(melt_ckpt, tiny_ckpt, text_file, tmp_path, monkeypatch, where):
    """Two micro-batches per step (gradient accumulation); Ctrl-C inside step 3 (during its first
    micro-batch) or right after step 2, then --resume: every later loss and the final weights
    equal an uninterrupted run's, bit for bit."""
    settings, data = DistillSettings(phase=2), DataArgs(text_file)
    straight = run_phase(melt_ckpt, tiny_ckpt, settings, data, _args(tmp_path / "a", 5, batch_tokens=2 * SEQ))
    calls = {"n": 0}
    original = DistillObjective.loss

    def interrupting(self, wrapped, ids, step, targets=None):
        calls["n"] += 1
        out = original(self, wrapped, ids, step, targets)
        if where == "between micro-batches" and calls["n"] == 5:  # step 3, after its 1st micro-batch's loss
            raise KeyboardInterrupt
        return out

    def stop_after_two(m):
        if where == "at a step boundary" and m["step"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(DistillObjective, "loss", interrupting)
    with pytest.raises(TrainingInterruptedError, match="after step 2"):
        run_phase(
            melt_ckpt, tiny_ckpt, settings, data, _args(tmp_path / "b", 5, batch_tokens=2 * SEQ), on_step=stop_after_two
        )
    monkeypatch.setattr(DistillObjective, "loss", original)
    resumed = run_phase(
        melt_ckpt, tiny_ckpt, settings, data, _args(tmp_path / "b", 5, batch_tokens=2 * SEQ, resume=tmp_path / "b")
    )
    a, b = _metrics(straight.out), _metrics(resumed.out)
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5]
    assert [m["loss"] for m in a] == [m["loss"] for m in b]
    wa, wb = load_model(straight.out).state_dict(), load_model(resumed.out).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_refuses_changed_settings(melt_ckpt, tiny_ckpt, text_file, tmp_path):
    run_phase(melt_ckpt, tiny_ckpt, DistillSettings(phase=1), DataArgs(text_file), _args(tmp_path / "r", 2))
    with pytest.raises(InvalidArgumentError, match="seq_len"):
        run_phase(
            melt_ckpt,
            tiny_ckpt,
            DistillSettings(phase=1),
            DataArgs(text_file),
            _args(tmp_path / "r", 2, seq_len=16, batch_tokens=32, resume=tmp_path / "r"),
        )


def test_nan_loss_stops_and_keeps_last_good_checkpoint(melt_ckpt, tiny_ckpt, text_file, tmp_path, monkeypatch):
    original = DistillObjective.loss

    def poisoned(self, wrapped, ids, step, targets=None):
        loss, parts = original(self, wrapped, ids, step, targets)
        return (loss * float("nan") if step == 2 else loss), parts

    monkeypatch.setattr(DistillObjective, "loss", poisoned)
    with pytest.raises(TrainingDivergedError, match=r"nan at step 3.*step-000002"):
        run_phase(
            melt_ckpt, tiny_ckpt, DistillSettings(phase=2), DataArgs(text_file), _args(tmp_path / "r", 4, save_every=1)
        )
    assert (tmp_path / "r" / "checkpoints" / "step-000002" / "run_state.json").is_file()
    assert not (tmp_path / "r" / "config.json").exists()


def test_nan_gradient_with_finite_loss_is_not_applied(melt_ckpt, tiny_ckpt, text_file, tmp_path, monkeypatch):
    original = DistillObjective.loss

    def nan_gradient(self, wrapped, ids, step, targets=None):
        loss, parts = original(self, wrapped, ids, step, targets)
        if step == 2:  # sqrt at 0: the value stays finite, its gradient is inf * 0 = nan
            gate = self.student.gate_parameters()[0]
            loss = loss + torch.sqrt(gate.sum() * 0.0)
        return loss, parts

    monkeypatch.setattr(DistillObjective, "loss", nan_gradient)
    run = tmp_path / "r"
    with pytest.raises(TrainingDivergedError, match=r"gradient norm is nan at step 3.*step-000002"):
        run_phase(melt_ckpt, tiny_ckpt, DistillSettings(phase=2), DataArgs(text_file), _args(run, 4, save_every=1))
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-000001", "step-000002"]
    assert all(checkpoint_is_finite(p) for p in (run / "checkpoints").glob("step-*"))
    assert not (run / "config.json").exists()


def test_incompatible_pairs_and_bad_data(melt_ckpt, tiny_ckpt, tokenizer, text_file, tmp_path):
    with pytest.raises(UnsupportedModelError, match="student must be MELT"):
        run_phase(tiny_ckpt, tiny_ckpt, DistillSettings(phase=1), DataArgs(text_file), _args(tmp_path / "a"))
    other = write_random_ouro(
        tmp_path / "other",
        tokenizer=tokenizer,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=3,
        intermediate_size=64,
    )
    with pytest.raises(InvalidArgumentError, match="hidden_size: student 48 vs teacher 32"):
        run_phase(melt_ckpt, other, DistillSettings(phase=1), DataArgs(text_file), _args(tmp_path / "b"))
    with pytest.raises(UnsupportedModelError, match="teacher must be Ouro"):
        run_phase(melt_ckpt, melt_ckpt, DistillSettings(phase=1), DataArgs(text_file), _args(tmp_path / "c"))
    (tmp_path / "short.txt").write_text("too short")
    result = runner.invoke(
        app,
        [
            "transition",
            str(melt_ckpt),
            "--data",
            str(tmp_path / "short.txt"),
            "--out",
            str(tmp_path / "d"),
            "--seq-len",
            "64",
            "--steps",
            "1",
        ],
    )
    assert result.exit_code == 1 and "fewer than one sequence of 64" in result.stderr
    assert not (tmp_path / "d" / "config.json").exists()


def test_cli_distill_all_and_existing_out(melt_ckpt, text_file, tmp_path):
    out = tmp_path / "melt"
    args = ["--data", str(text_file), "--out", str(out), "--steps", "2", "--seq-len", str(SEQ)]
    result = runner.invoke(app, ["distill", "--phase", "all", str(melt_ckpt), *args])
    assert result.exit_code == 0, result.output
    assert (out / "phase1" / "config.json").is_file() and (out / "phase2" / "config.json").is_file()
    info = json.loads(runner.invoke(app, ["info", str(out / "phase2"), "--json"]).stdout)
    assert info["model_type"] == "melt"
    again = runner.invoke(
        app,
        [
            "distill",
            "--phase",
            "2",
            str(melt_ckpt),
            "--data",
            str(text_file),
            "--out",
            str(out / "phase2"),
            "--steps",
            "1",
            "--seq-len",
            str(SEQ),
        ],
    )
    assert again.exit_code == 1 and "--force" in again.stderr


def test_two_process_fsdp_transition(melt_ckpt, text_file, tmp_path):
    """Phase 1 under `accelerate launch --multi_gpu --num_processes 2 ... --fsdp --shard-teacher` on
    CPUs: accelerate's FSDP2 over the MELT student (each decoder layer a unit, called once per loop
    and chunk), the teacher sharded too, the held-out evaluation and the final model from the
    gathered weights."""
    out = tmp_path / "fsdp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    cmd += ["-m", "melt_cli", "transition", str(melt_ckpt), "--data", str(text_file), "--out", str(out), "--fsdp"]
    cmd += ["--shard-teacher"]
    cmd += ["--eval-data", str(text_file), "--eval-batches", "2", "--eval-every", "1", "--steps", "2"]
    cmd += ["--seq-len", str(SEQ)]
    cmd += ["--batch-tokens", str(4 * SEQ)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MELT_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr.count("2 processes (FSDP2) on cpu") == 1
    assert [m["step"] for m in _metrics(out)] == [1, 2]
    evals = [json.loads(ln)["eval"] for ln in (out / "metrics.jsonl").read_text().splitlines() if "eval" in ln]
    assert len(evals) == 2 and all(math.isfinite(v) for e in evals for v in e.values())
    assert json.loads((out / "run_config.json").read_text())["world_size"] == 2
    assert type(load_model(out)).__name__ == "MeltForCausalLM"
    shutil.rmtree(out)


def test_resume_extends_steps_and_reads_the_run_config(text_file, tmp_path):
    run = tmp_path / "run"
    first = [
        "pretrain",
        "--data",
        str(text_file),
        "--out",
        str(run),
        "--preset",
        "tiny",
        "--loops",
        "2",
        "--vocab-size",
        "300",
        "--steps",
        "2",
        "--seq-len",
        "32",
        "--micro-batch",
        "2",
        "--lr",
        "0.005",
        "--save-every",
        "1",
        "--eval-every",
        "0",
    ]
    assert runner.invoke(app, first).exit_code == 0
    # only --steps: every other training option comes from the run's run_config.json
    again = runner.invoke(
        app,
        [
            "pretrain",
            "--data",
            str(text_file),
            "--preset",
            "tiny",
            "--loops",
            "2",
            "--vocab-size",
            "300",
            "--resume",
            str(run),
            "--steps",
            "4",
        ],
    )
    assert again.exit_code == 0, again.output
    config = json.loads((run / "run_config.json").read_text())
    assert (config["steps"], config["seq_len"], config["micro_batch"], config["lr"]) == (4, 32, 2, 0.005)
    assert [m["step"] for m in _metrics(run)] == [1, 2, 3, 4]
    behind = runner.invoke(
        app,
        [
            "pretrain",
            "--data",
            str(text_file),
            "--preset",
            "tiny",
            "--loops",
            "2",
            "--vocab-size",
            "300",
            "--resume",
            str(run),
            "--steps",
            "3",
        ],
    )
    assert "is at step 4; --steps 3 is behind it" in one_red_line(behind)


def test_resume_refuses_missing_and_foreign_runs(melt_ckpt, text_file, tmp_path):
    base = ["distill", "--phase", "2", str(melt_ckpt), "--data", str(text_file), "--steps", "1", "--seq-len", "32"]
    assert "does not exist" in one_red_line(runner.invoke(app, [*base, "--resume", str(tmp_path / "nope")]))
    run = tmp_path / "p1"
    assert (
        runner.invoke(
            app,
            [
                "transition",
                str(melt_ckpt),
                "--data",
                str(text_file),
                "--out",
                str(run),
                "--steps",
                "1",
                "--seq-len",
                "32",
            ],
        ).exit_code
        == 0
    )
    line = one_red_line(runner.invoke(app, [*base, "--resume", str(run)]))
    assert "distill phase 1 run; it cannot resume distill phase 2" in line
    (tmp_path / "plain").mkdir()
    assert "not a melt run directory" in one_red_line(runner.invoke(app, [*base, "--resume", str(tmp_path / "plain")]))


def test_trackers_get_every_log_every_step_and_the_eval(melt_ckpt, tiny_ckpt, text_file, tmp_path):
    from accelerate.tracking import GeneralTracker

    from melt_core.training import train

    class Recorder(GeneralTracker):
        name, requires_logging_directory, main_process_only = "recorder", False, True

        def __init__(self):
            super().__init__()
            self.config, self.logs, self.finished = None, [], False

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            self.config = values

        def log(self, values, step=None, **kwargs):
            self.logs.append((step, values))

        def finish(self):
            self.finished = True

    recorder = Recorder()
    objective = DistillObjective(melt_ckpt, tiny_ckpt, DistillSettings(phase=2), steps=5)
    data = PackedSequences.from_path(text_file, load_tokenizer(melt_ckpt), SEQ)
    train(objective, data, _args(tmp_path / "r", 5, log_every=2), eval_data=data, trackers=[recorder])
    assert [step for step, values in recorder.logs if "loss" in values] == [2, 4, 5]
    assert [step for step, values in recorder.logs if "eval/loss_loop1" in values] == [5]
    assert recorder.config["seq_len"] == SEQ and recorder.config["objective"] == "distill phase 2"
    assert recorder.finished


def test_log_with_a_tracker_that_is_not_installed(melt_ckpt, text_file, tmp_path, monkeypatch):
    import melt_core.training.trainer as trainer

    monkeypatch.setattr(trainer, "get_available_trackers", lambda: [])
    args = [
        "transition",
        str(melt_ckpt),
        "--data",
        str(text_file),
        "--out",
        str(tmp_path / "o"),
        "--log-with",
        "tensorboard",
        "--steps",
        "1",
    ]
    assert "pip install 'melt[tensorboard]'" in one_red_line(runner.invoke(app, args))
    args[-3:] = ["nosuch", "--steps", "1"]
    assert "choose from" in one_red_line(runner.invoke(app, args))


def test_presets_apply_to_the_options_left_at_their_defaults(melt_ckpt, text_file, tmp_path):
    paper = ["distill", "--phase", "2", str(melt_ckpt), "--data", str(text_file), "--preset", "paper"]
    # the paper's 10,000-token sequences do not fit the tiny model's 2,048 positions: the preset arrived
    line = one_red_line(runner.invoke(app, [*paper, "--out", str(tmp_path / "a")]))
    assert "--seq-len 10000 exceeds the model's maximum 2048" in line
    given = [*paper, "--out", str(tmp_path / "b"), "--seq-len", "32", "--batch-tokens", "64", "--steps", "1"]
    assert runner.invoke(app, given).exit_code == 0
    config = json.loads((tmp_path / "b" / "run_config.json").read_text())
    assert (config["seq_len"], config["batch_tokens"], config["steps"]) == (32, 64, 1)
    assert config["objective"]["checkpoint_chunks"] is True  # the preset's, a distillation setting
    quick = ["transition", str(melt_ckpt), "--data", str(text_file), "--out", str(tmp_path / "c"), "--steps", "1"]
    quick += ["--chunk-size", "128"]  # the tiny model's chunks of 4 make 512 tokens slow
    assert runner.invoke(app, quick).exit_code == 0
    assert json.loads((tmp_path / "c" / "run_config.json").read_text())["seq_len"] == 512


@pytest.mark.slow  # about 40 s: two launches of two processes (test_distributed.py has the fast ones)
def test_two_process_ddp_checkpoint_and_resume(text_file, tmp_path):
    """Real DDP (torchrun, 2 CPU processes, gloo): every process saves its RNG state, and both
    resume from the checkpoint and go on."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "melt_cli", "pretrain"]
    cmd += ["--device", "cpu", "--preset", "tiny", "--loops", "2", "--vocab-size", "300", "--seq-len", "32"]
    cmd += ["--micro-batch", "1", "--batch-tokens", "128", "--eval-every", "0", "--data", str(text_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MELT_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    for extra in (["--out", str(out), "--steps", "2", "--save-every", "1"], ["--resume", str(out), "--steps", "3"]):
        proc = subprocess.run([*cmd, *extra], capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [m["step"] for m in _metrics(out)] == [1, 2, 3]
    assert sorted(p.name for p in (out / "checkpoints" / "step-000002").glob("rng-*")) == [
        "rng-0.safetensors",
        "rng-1.safetensors",
    ]
