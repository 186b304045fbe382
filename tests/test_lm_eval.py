"""lm-evaluation-harness on melt models, offline: local YAML + JSONL tasks (tests/lm_eval_tasks)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import time
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

from melt_core.integrations import lm_eval_model  # noqa: E402
from melt_core.integrations.lm_eval_model import MeltLM, evaluate_tasks, task_manager  # noqa: E402

TASKS = Path(__file__).parent / "lm_eval_tasks"
REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


@pytest.fixture
def tasks_dir(tmp_path, monkeypatch):
    """The shipped tasks, run from their folder (data_files relative to the working directory)."""
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
    base = ["eval", "tasks", str(melt_ckpt), "--include-path", "."]
    result = runner.invoke(app, [*base, "--tasks", "melt_tiny_mc", "--loops", "1,2", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report["results"]) == {"1", "2"} and report["documents"] == {"melt_tiny_mc": 6}
    assert 0.0 <= report["results"]["2"]["melt_tiny_mc"]["acc"] <= 1.0
    table = runner.invoke(app, [*base, "--tasks", "melt_tiny_mc,melt_tiny_gen_strip", "--limit", "2"])
    assert table.exit_code == 0 and "melt_tiny_mc" in table.stdout and "exact_match,strip" in table.stdout
    assert "stderr," not in table.stdout and "_stderr" not in table.stdout  # a stderr is a column, never a row
    one_command = ["eval", str(melt_ckpt), "--tasks", "melt_tiny_mc", "--include-path", "."]
    assert "exactly one" in one_red_line(runner.invoke(app, [*one_command, "--data", "x.txt"]))


@pytest.mark.slow  # indexes lm-eval's ~15k built-in tasks (10-20 s)
def test_an_unknown_task_is_one_line(tasks_dir, melt_ckpt):
    command = ["eval", "tasks", str(melt_ckpt), "--tasks", "no_such_task", "--include-path", "."]
    assert "unknown lm-eval task(s): no_such_task" in one_red_line(runner.invoke(app, command))


def test_accuracy_on_the_built_in_example(tasks_dir):
    out = run("example", ["melt_tiny_mc"], batch_size=6)
    correct = check_multiple_choice(out, load_model("example"), load_tokenizer("example"))
    print(f"example: {sum(correct)} of {len(correct)} correct")


# --- melt-lm-eval and lm-eval's command line --------------------------------------------------
# The command of the README, as a user runs it from the repository root.
MODEL_ARGS = "pretrained=example,loops=4,batch_size=4"
COMMAND = ["--model", "melt", "--tasks", "melt_tiny_mc", "--include_path", "tests/lm_eval_tasks", "--limit", "4"]
TABLE_ROW = re.compile(r"^\|melt_tiny_mc\s*\|.*\|acc\s*\|.*\|\s*[01](\.\d+)?\s*\|", re.MULTILINE)


@pytest.fixture
def repo_root(tmp_path, monkeypatch):
    """Runs from the repository root: the tasks' data_files are not in the working directory."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    return REPO


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """Runs from an empty folder outside any git repository."""
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    return tmp_path / "cwd"


def test_lm_eval_arguments_fill_only_what_model_args_do_not_give():
    # lm-eval's CLI passes its own batch_size/device (defaults 1 and "cuda:0") next to model_args
    lm = MeltLM.create_from_arg_string(
        "pretrained=example,batch_size=4,device=cpu", {"batch_size": 1, "max_batch_size": None, "device": "cuda:0"}
    )
    assert lm.batch_size == 4 and lm.model.device.type == "cpu"
    lm = MeltLM.create_from_arg_obj(
        {"pretrained": "example"}, {"batch_size": "2", "max_batch_size": 8, "device": "cpu"}
    )
    assert lm.batch_size == 2 and lm.model.device.type == "cpu"


def test_simple_evaluate_from_the_repository_root(repo_root):
    """lm-eval's own call, as its CLI makes it: data_files are read next to the task's YAML."""
    out = lm_eval.simple_evaluate(
        model="melt",
        model_args=f"{MODEL_ARGS},device=cpu",
        tasks=["melt_tiny_mc"],
        task_manager=task_manager(["melt_tiny_mc"], "tests/lm_eval_tasks"),
        limit=4,
        batch_size=1,
        device="cuda:0",
    )
    assert out["n-samples"]["melt_tiny_mc"]["effective"] == 4
    assert 0.0 <= out["results"]["melt_tiny_mc"]["acc,none"] <= 1.0


def test_tasks_and_filtered_metrics_from_anywhere_without_noise(elsewhere, capfd):
    report = evaluate_tasks(
        "example", ["melt_tiny_mc", "melt_tiny_gen_strip"], include_path=TASKS, limit=2, device="cpu"
    )
    assert report.documents == {"melt_tiny_mc": 2, "melt_tiny_gen_strip": 2}
    (results,) = report.results.values()
    assert set(results["melt_tiny_gen_strip"]) == {"exact_match,strip", "exact_match,strip_stderr"}
    assert set(results["melt_tiny_mc"]) == {"acc", "acc_stderr"}
    err = capfd.readouterr().err
    assert "fatal" not in err and "it/s" not in err and "examples/s" not in err, err  # git, tqdm, datasets
    assert lm_eval.evaluator.get_git_commit_hash is lm_eval.loggers.utils.get_git_commit_hash  # put back


def test_metric_names():
    values = {"acc,none": 0.5, "acc_stderr,none": 0.25, "exact_match,strip": 1.0, "exact_match_stderr,strip": 0.0}
    values |= {"alias": "t", "acc_norm,none": 0.5, "acc_norm_stderr,none": "N/A"}
    assert lm_eval_model._metrics(values) == {
        "acc": 0.5,
        "acc_stderr": 0.25,
        "exact_match,strip": 1.0,
        "exact_match,strip_stderr": 0.0,
        "acc_norm": 0.5,
    }


def melt_lm_eval(monkeypatch, *args: str) -> None:
    """``melt-lm-eval ARGS`` in this process (lm-eval's logging left as it is)."""
    monkeypatch.setattr(sys, "argv", ["melt-lm-eval", *args])
    monkeypatch.setattr(lm_eval.utils, "setup_logging", lambda *a, **k: None)
    lm_eval_model.cli()


def test_melt_lm_eval_in_process(repo_root, monkeypatch, capsys):
    devices = []
    resolve = lm_eval_model.resolve_device
    monkeypatch.setattr(lm_eval_model, "resolve_device", lambda name: devices.append(name) or resolve(name))
    melt_lm_eval(monkeypatch, *COMMAND, "--model_args", MODEL_ARGS)  # no --device: melt's auto, not cuda:0
    assert TABLE_ROW.search(capsys.readouterr().out)
    melt_lm_eval(monkeypatch, *COMMAND, "--model_args", MODEL_ARGS, "--device", "cpu", "--batch_size", "2")
    assert TABLE_ROW.search(capsys.readouterr().out)
    assert devices == ["auto", "cpu"]
    assert lm_eval.tasks.TaskManager is lm_eval.tasks.manager.TaskManager  # lm-eval's own, put back


def test_melt_lm_eval_errors_are_one_line(repo_root, monkeypatch, capsys):
    for model_args, device in [("pretrained=no/such/dir", []), (MODEL_ARGS, ["--device", "cuda:99"])]:
        with pytest.raises(SystemExit) as exit_:
            melt_lm_eval(monkeypatch, *COMMAND[:-2], "--model_args", model_args, *device)
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert exit_.value.code == 1 and not any("Traceback" in ln for ln in lines)
        assert lines[-1].startswith("error: ") and sum("error:" in ln for ln in lines) == 1, lines
    assert "'cuda:99' is not available" in lines[-1]  # an explicit --device is kept: no silent fallback


def test_lm_eval_entry_point():
    """lm-eval releases that read the "lm_eval.models" entry-point group load melt's model by it
    (lm-eval 0.4.13 does not read it: melt-lm-eval registers the model instead)."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    value = project["entry-points"]["lm_eval.models"]["melt"]
    assert importlib.metadata.EntryPoint("melt", value, "lm_eval.models").load() is MeltLM
    assert project["scripts"]["melt-lm-eval"] == "melt_core.integrations.lm_eval_model:cli"


def test_melt_lm_eval_command(repo_root, tmp_path):
    """The README's command, run as a user runs it (a subprocess, from the repository root)."""
    script = shutil.which("melt-lm-eval", path=str(Path(sys.executable).parent)) or shutil.which("melt-lm-eval")
    assert script is not None, "melt-lm-eval is not installed: pip install -e '.[eval]'"
    start = time.perf_counter()
    done = subprocess.run(
        [script, *COMMAND, "--model_args", f"{MODEL_ARGS},device=cpu"],
        cwd=REPO,
        env={**os.environ, "LMEVAL_LOG_LEVEL": "WARNING"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert TABLE_ROW.search(done.stdout), done.stdout
    assert "fatal" not in done.stderr and "Traceback" not in done.stderr
    print(f"melt-lm-eval: {time.perf_counter() - start:.1f} s")
