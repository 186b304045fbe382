"""`melt pretrain` (a few steps on the tiny preset) and `melt eval` (equal to a hand computation)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import melt_core.training.pretrain as pretrain_module
from melt_cli.app import app
from melt_core import load_model, load_tokenizer
from melt_core.checkpoints.convert import convert_ouro_to_melt
from melt_core.data import PackedSequences
from melt_core.errors import UnsupportedModelError
from melt_core.evaluation import EvalSettings, evaluate_checkpoint
from melt_core.training.pretrain import LoopLMLoss, PretrainSettings, run_pretrain
from melt_core.training.trainer import TrainingArgs

runner = CliRunner()


def _pretrain_args(out, **kw):
    return TrainingArgs(
        out=out,
        **{"steps": 12, "seq_len": 32, "micro_batch": 4, "lr": 3e-3, "warmup_steps": 0, "eval_batches": 2, **kw},
    )


@pytest.mark.parametrize("objective", ["uniform", "ouro"])
def test_pretrain_tiny_loss_decreases(text_file, tmp_path, objective):
    settings = PretrainSettings(preset="tiny", loops=3, vocab_size=300, objective=objective)
    result = run_pretrain(settings, text_file, _pretrain_args(tmp_path / "run"), eval_data=text_file)
    metrics = [json.loads(ln) for ln in (result.out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1
    model = load_model(result.out)
    assert model.config.model_type == "ouro" and model.config.total_ut_steps == 3
    tok = load_tokenizer(result.out)
    assert len(tok) == model.config.vocab_size <= 300
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert {"loss_loop1", "loss_loop3"} <= result.eval_metrics.keys()
    if objective == "ouro":  # the exit gate is trained by the Ouro objective only
        assert "exit_entropy" in metrics[0]


def test_pretrain_resume_reuses_tokenizer(text_file, tmp_path, monkeypatch):
    settings = PretrainSettings(preset="tiny", loops=2, vocab_size=300)
    run_pretrain(settings, text_file, _pretrain_args(tmp_path / "run", steps=4, save_every=2))
    first = (tmp_path / "run" / "tokenizer" / "tokenizer.json").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("--resume trained a new tokenizer instead of reusing the run's")

    monkeypatch.setattr(pretrain_module, "train_bpe_tokenizer", no_training)
    run_pretrain(settings, text_file, _pretrain_args(tmp_path / "run", steps=4, save_every=2, resume=tmp_path / "run"))
    assert (tmp_path / "run" / "tokenizer.json").read_text() == first


def test_ramp_objective_weights_loops_by_index(tiny_ckpt, text_file):
    model = load_model(tiny_ckpt)
    ids = PackedSequences.from_path(text_file, load_tokenizer(tiny_ckpt), 16).sequences[:2]
    loss, parts = LoopLMLoss(model, PretrainSettings(objective="ramp"))(ids)
    logits = model(ids, return_loop_logits=True).loop_logits
    ce = [F.cross_entropy(x[:, :-1].reshape(-1, x.shape[-1]), ids[:, 1:].reshape(-1)).item() for x in logits]
    assert len(ce) == 4 and [parts[f"ce_loop{t + 1}"].item() for t in range(4)] == pytest.approx(ce, rel=1e-5)
    assert loss.item() == pytest.approx(sum((t + 1) / 10 * c for t, c in enumerate(ce)), rel=1e-5)


def test_pretrain_init_from_starts_at_the_checkpoint(tiny_ckpt, text_file, tmp_path):
    settings = PretrainSettings(init_from=tiny_ckpt)
    result = run_pretrain(settings, text_file, _pretrain_args(tmp_path / "run", steps=2, lr=0.0))
    before, after = load_model(tiny_ckpt).state_dict(), load_model(result.out).state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (result.out / name).read_text() == (tiny_ckpt / name).read_text(), name


def test_pretrain_init_from_refuses_melt_and_shape_flags(tiny_ckpt, text_file, tmp_path):
    convert_ouro_to_melt(tiny_ckpt, tmp_path / "melt")
    with pytest.raises(UnsupportedModelError, match="needs an Ouro checkpoint"):
        run_pretrain(PretrainSettings(init_from=tmp_path / "melt"), text_file, _pretrain_args(tmp_path / "run"))
    result = runner.invoke(
        app,
        [
            "pretrain",
            "--data",
            str(text_file),
            "--out",
            str(tmp_path / "x"),
            "--init-from",
            str(tiny_ckpt),
            "--loops",
            "2",
            "--preset",
            "tiny",
        ],
    )
    assert result.exit_code == 1 and "drop --preset, --loops" in result.stderr


def test_cli_pretrain_rejects_tokenizer_with_vocab_size(text_file, tiny_ckpt, tmp_path):
    result = runner.invoke(
        app,
        [
            "pretrain",
            "--data",
            str(text_file),
            "--out",
            str(tmp_path / "x"),
            "--tokenizer",
            str(tiny_ckpt),
            "--vocab-size",
            "100",
        ],
    )
    assert result.exit_code == 1 and "exclude each other" in result.stderr


def test_eval_equals_hand_computation(tiny_ckpt, text_file):
    settings = EvalSettings(seq_len=16, max_sequences=5, batch_size=2)
    report = evaluate_checkpoint(tiny_ckpt, text_file, settings, teacher=tiny_ckpt, loops=[None, 2])
    model = load_model(tiny_ckpt)
    ids = PackedSequences.from_path(text_file, load_tokenizer(tiny_ckpt), 16).sequences[:5]
    for count in (4, 2):
        out = model(ids, loops=count, return_loop_logits=True)
        for r, logits in zip(report.results[count], out.loop_logits):
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            assert r.loss == pytest.approx(loss.item(), rel=1e-5)
            assert r.perplexity == pytest.approx(torch.exp(loss).item(), rel=1e-5)
            assert r.kl_to_teacher == pytest.approx(0.0, abs=1e-6) and r.top1_agreement == 1.0
    assert report.tokens == 5 * 16 and report.sequences == 5


def test_cli_eval_json_and_table(tiny_ckpt, text_file):
    result = runner.invoke(
        app,
        [
            "eval",
            "text",
            str(tiny_ckpt),
            "--data",
            str(text_file),
            "--seq-len",
            "16",
            "--max-sequences",
            "3",
            "--loops",
            "1,4",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report["results"]) == {"1", "4"} and len(report["results"]["4"]) == 4
    assert report["results"]["1"][0]["loss"] == pytest.approx(report["results"]["4"][0]["loss"], rel=1e-6)
    table = runner.invoke(
        app,
        [
            "eval",
            "text",
            str(tiny_ckpt),
            "--data",
            str(text_file),
            "--seq-len",
            "16",
            "--max-sequences",
            "2",
            "--teacher",
            str(tiny_ckpt),
        ],
    )
    assert table.exit_code == 0 and "perplexity" in table.stdout and "100.00%" in table.stdout
    bad = runner.invoke(app, ["eval", "text", str(tiny_ckpt), "--data", str(text_file), "--loops", "0"])
    assert bad.exit_code == 1 and "--loops" in bad.stderr
