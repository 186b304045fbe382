"""lm-evaluation-harness on melt models, offline: local YAML + JSONL tasks (tests/lm_eval_tasks)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cli_helpers import one_red_line
from typer.testing import CliRunner

from melt_cli.app import app
from melt_core import load_model, load_tokenizer
from melt_core.inference import GenerationSettings, generate_text

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from melt_core.integrations.lm_eval_model import MeltLM, task_manager  # noqa: E402

TASKS = Path(__file__).parent / "lm_eval_tasks"
runner = CliRunner()


@pytest.fixture
def tasks_dir(tmp_path, monkeypatch):
    """The shipped tasks, run from their folder (lm-eval reads data_files relative to the cwd)."""
    shutil.copytree(TASKS, tmp_path / "tasks")
    monkeypatch.chdir(tmp_path / "tasks")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    return tmp_path / "tasks"


def direct_loglikelihood(model, tokenizer, context: str, continuation: str, loops: int | None = None) -> float:
    """The continuation's log-probability under melt, one sequence alone (lm-eval's encoding:
    the whole text is encoded, the context's tokens split off)."""
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    n = len(whole) - len(tokenizer.encode(context, add_special_tokens=False))
    return score(model, whole[:-n], whole[-n:], loops)


def score(model, context: list[int], target: list[int], loops: int | None = None) -> float:
    ids = torch.tensor((context + target)[:-1])[None]
    with torch.no_grad():
        log_probs = F.log_softmax(model(ids, loops=loops).logits[0, -len(target) :].float(), -1)
    return log_probs.gather(-1, torch.tensor(target)[:, None]).sum().item()


def run(checkpoint, tasks, **model_args):
    args = ",".join(f"{k}={v}" for k, v in {"pretrained": checkpoint, **model_args}.items())
    return lm_eval.simple_evaluate(
        model="melt", model_args=args, tasks=tasks, task_manager=task_manager(tasks, "."), log_samples=True
    )


def check_multiple_choice(out, model, tokenizer, loops=None) -> list[bool]:
    """Every document's per-choice log-likelihoods equal melt's, computed alone; returns whether
    melt's best choice is the answer, per document."""
    correct = []
    for sample in out["samples"]["melt_tiny_mc"]:
        doc = sample["doc"]
        pairs = sample["arguments"]  # (context, " " + choice) per choice: lm-eval's target delimiter
        assert [cont for _, cont in _pairs(pairs)] == [" " + c for c in doc["choices"]]
        expected = [direct_loglikelihood(model, tokenizer, ctx, cont, loops) for ctx, cont in _pairs(pairs)]
        assert [r[0][0] for r in sample["resps"]] == pytest.approx(expected, abs=1e-4)
        correct.append(max(range(len(expected)), key=expected.__getitem__) == doc["answer"])
    assert out["results"]["melt_tiny_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))
    return correct


def _pairs(arguments) -> list[tuple[str, str]]:
    """lm-eval's logged request arguments -> (context, continuation) pairs."""
    if isinstance(arguments, dict):  # {"gen_args_0": {"arg_0": ctx, "arg_1": cont}, ...}
        arguments = [(a["arg_0"], a["arg_1"]) for a in arguments.values()]
    return [(ctx, cont) for ctx, cont in arguments]


@pytest.mark.parametrize("name", ["tiny_ckpt", "melt_ckpt"])
def test_multiple_choice_log_likelihoods_equal_melt_batched_or_not(tasks_dir, name, request):
    checkpoint = request.getfixturevalue(name)
    model, tokenizer = load_model(checkpoint), load_tokenizer(checkpoint)
    out = run(checkpoint, ["melt_tiny_mc"], batch_size=4, loops=2)
    check_multiple_choice(out, model, tokenizer, 2)
    # the same requests one by one, through the adapter's scorer: equal to the batched ones
    lm = MeltLM(str(checkpoint), loops=2, batch_size=4)
    pairs = [lm._encode_pair(c, t) for s in out["samples"]["melt_tiny_mc"] for c, t in _pairs(s["arguments"])]
    batched = lm.score_tokens(pairs)
    lm.batch_size = 1
    for (a, greedy_a), (b, greedy_b) in zip(batched, lm.score_tokens(pairs), strict=True):
        assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b


def test_generation_task_uses_melt_generate(tasks_dir, melt_ckpt):
    out = run(melt_ckpt, ["melt_tiny_gen"], batch_size=2)
    model, tokenizer = load_model(melt_ckpt), load_tokenizer(melt_ckpt)
    samples = out["samples"]["melt_tiny_gen"]
    prompts = [s["doc"]["prompt"] for s in samples]
    settings = GenerationSettings(max_new_tokens=8, stop=("\n", ".", tokenizer.decode([tokenizer.eos_token_id])))
    expected = [r.text for r in generate_text(model, tokenizer, prompts, settings).results]
    assert [s["resps"][0][0] for s in samples] == expected
    matches = [e.strip().lower() == s["doc"]["target"].strip().lower() for e, s in zip(expected, samples, strict=True)]
    assert out["results"]["melt_tiny_gen"]["exact_match,none"] == pytest.approx(sum(matches) / len(matches))


def test_rolling_log_likelihood_is_the_whole_text(melt_ckpt):
    lm = MeltLM(str(melt_ckpt), batch_size=2, max_length=8)
    text = "Once upon a time there was a king who lived in a castle by the sea."

    class Request:
        args = (text,)

    (total,) = lm.loglikelihood_rolling([Request()])
    tokens = lm.tokenizer.encode(text, add_special_tokens=False)
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, lm.prefix_token_id, 8, 1)]
    assert sum(len(target) for _, target in windows) == len(tokens)  # every token predicted once
    assert total == pytest.approx(sum(score(lm.model, c, t) for c, t in windows), abs=1e-4)


def test_melt_eval_tasks_cli(tasks_dir, melt_ckpt):
    base = ["eval", str(melt_ckpt), "--tasks", "melt_tiny_mc", "--include-path", "."]
    result = runner.invoke(app, [*base, "--loops", "1,2", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report["results"]) == {"1", "2"} and report["documents"] == {"melt_tiny_mc": 6}
    assert 0.0 <= report["results"]["2"]["melt_tiny_mc"]["acc"] <= 1.0
    table = runner.invoke(app, [*base, "--limit", "2"])
    assert table.exit_code == 0 and "melt_tiny_mc" in table.stdout
    assert "exactly one" in one_red_line(runner.invoke(app, [*base, "--data", "x.txt"]))
    assert "--limit applies to --tasks and problem files" in one_red_line(
        runner.invoke(app, ["eval", str(melt_ckpt), "--data", "x", "--limit", "2"])
    )


@pytest.mark.slow  # indexes lm-eval's ~15k built-in tasks (10-20 s)
def test_an_unknown_task_is_one_line(tasks_dir, melt_ckpt):
    error = one_red_line(runner.invoke(app, ["eval", str(melt_ckpt), "--tasks", "no_such_task", "--include-path", "."]))
    assert "unknown lm-eval task(s): no_such_task" in error


def test_accuracy_on_the_built_in_example(tasks_dir):
    out = run("example", ["melt_tiny_mc"], batch_size=6)
    correct = check_multiple_choice(out, load_model("example"), load_tokenizer("example"))
    print(f"example: {sum(correct)} of {len(correct)} correct")
