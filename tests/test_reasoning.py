"""The multi-hop reasoning task: generator, problem files in training, and accuracy per loop."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
import torch.nn.functional as F
from cli_helpers import one_red_line
from typer.testing import CliRunner

from melt_cli.app import app
from melt_core import load_model, load_tokenizer
from melt_core.data import PackedSequences, encode_problem, is_problem_file, training_sequences
from melt_core.errors import InvalidArgumentError
from melt_core.evaluation import evaluate_problems
from melt_core.evaluation.problems import answer_scores
from melt_core.models import is_melt
from melt_core.models.chunks import chunk_lengths
from melt_core.tasks import ChainTask, make_problems, write_problems
from melt_core.tasks.chains import canonical_form

runner = CliRunner()


def resolve_by_graph(prompt: str) -> tuple[str, int]:
    """An independent solver: build the assignment graph, walk it outwards from every chain end (a
    name never assigned), and read the query's end and depth off the walk."""
    *statements, query = prompt.split()
    name = query.removesuffix("?")
    edges: dict[str, list[str]] = {}  # right side -> the names assigned from it
    for statement in statements:
        left, right = statement.split("=")
        edges.setdefault(right, []).append(left)
    assigned = {s.split("=")[0] for s in statements}
    found: dict[str, tuple[str, int]] = {}
    frontier = [(end, end, 0) for end in edges if end not in assigned]
    while frontier:
        node, end, depth = frontier.pop()
        for child in edges.get(node, []):
            assert child not in found, f"{child} is assigned twice"
            found[child] = (end, depth + 1)
            frontier.append((child, end, depth + 1))
    return found[name]


@pytest.mark.parametrize("hops", [1, 2, 5, 7])
def test_generator_answers_are_right_and_shaped_as_asked(hops):
    task = ChainTask(chains=3, names=26)
    problems = make_problems(task, [hops], 200, seed=7)
    for p in problems:
        answer, depth = resolve_by_graph(p.prompt)
        assert (p.answer, p.hops, depth) == (answer, hops, hops)
        statements = p.prompt.split()[:-1]
        assert len(statements) == 3 * hops  # every chain as long as the query's
        lefts = [s.split("=")[0] for s in statements]
        assert len(set(lefts)) == 3 * hops  # every name is assigned at most once
        ends = {s.split("=")[1] for s in statements} - set(lefts)
        assert len(ends) == 3 and p.answer in ends  # one end per chain: reading one off is right 1/3 of the time
        depths = sorted(resolve_by_graph(f"{' '.join(statements)} {name}?")[1] for name in lefts)
        assert depths.count(hops) == 3  # three heads, each `hops` from its end
    # the answer is not tied to a letter or to the first chain written
    assert len({p.answer for p in problems}) > 20


def test_generator_is_deterministic_per_seed():
    task = ChainTask()
    a = make_problems(task, range(1, 6), 50, seed=3)
    assert a == make_problems(task, range(1, 6), 50, seed=3)
    assert a != make_problems(task, range(1, 6), 50, seed=4)
    assert [p.hops for p in a[:7]] == [1, 2, 3, 4, 5, 1, 2]


def test_generator_refuses_impossible_shapes():
    with pytest.raises(InvalidArgumentError, match="--hops must be 1..7 for 3 chains over 26 names"):
        make_problems(ChainTask(chains=3, names=26), [8], 5, 0)
    with pytest.raises(InvalidArgumentError, match="--chains must be 1..6 for 12 names"):
        ChainTask(chains=7, names=12)
    with pytest.raises(InvalidArgumentError, match="--names"):
        ChainTask(names=1)


def test_held_out_problems_exclude_training_problems_in_any_statement_order():
    task = ChainTask()
    trained = make_problems(task, [1, 2, 3], 600, seed=0)
    plain = make_problems(task, [1, 2], 600, seed=0)
    overlap = {canonical_form(p.prompt) for p in plain} & {canonical_form(p.prompt) for p in trained}
    assert overlap  # files of one seed and other hop counts share problems: the reason to exclude
    shuffled = []  # the same problems with their statements in another order are the same problems
    for p in trained:
        *statements, query = p.prompt.split()
        random.Random(0).shuffle(statements)
        shuffled.append(dataclasses.replace(p, prompt=" ".join([*statements, query])))
    held_out = make_problems(task, [1, 2], 600, seed=0, exclude=shuffled)
    assert not {canonical_form(p.prompt) for p in held_out} & {canonical_form(p.prompt) for p in trained}
    assert [p.hops for p in held_out] == [p.hops for p in plain]
    assert make_problems(task, [1, 2], 50, seed=0, exclude=[]) == plain[:50]


def test_melt_data_reasoning_cli(tmp_path):
    out = tmp_path / "p.jsonl"
    result = runner.invoke(app, ["data", "reasoning", "--hops", "1-3", "--n", "30", "--seed", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 30 and {r["hops"] for r in records} == {1, 2, 3}
    assert [r["prompt"] for r in records] == [p.prompt for p in make_problems(ChainTask(), [1, 2, 3], 30, 2)]
    assert is_problem_file(out)
    assert "exists" in one_red_line(runner.invoke(app, ["data", "reasoning", "--out", str(out)]))
    bad = runner.invoke(app, ["data", "reasoning", "--hops", "two", "--out", str(tmp_path / "q.jsonl")])
    assert "--hops takes numbers" in one_red_line(bad)
    assert not (tmp_path / "q.jsonl").exists()


def test_melt_data_reasoning_excludes_training_files(tmp_path):
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    shape = ["--hops", "1-2", "--chains", "2", "--names", "6"]  # a small space: files of two seeds overlap
    made = runner.invoke(app, ["data", "reasoning", *shape, "--n", "300", "--seed", "0", "--out", str(train)])
    assert made.exit_code == 0, made.output
    args = ["data", "reasoning", *shape, "--n", "100", "--seed", "1", "--out", str(test)]
    assert runner.invoke(app, args).exit_code == 0
    seen = {canonical_form(json.loads(line)["prompt"]) for line in train.read_text().splitlines()}
    plain = [json.loads(line)["prompt"] for line in test.read_text().splitlines()]
    assert any(canonical_form(p) in seen for p in plain)
    assert runner.invoke(app, [*args, "--exclude", str(train), "--force"]).exit_code == 0
    held_out = [json.loads(line)["prompt"] for line in test.read_text().splitlines()]
    assert len(held_out) == 100 and not any(canonical_form(p) in seen for p in held_out)
    missing = runner.invoke(app, [*args, "--exclude", str(tmp_path / "nope.jsonl"), "--force"])
    assert "nope.jsonl" in one_red_line(missing)
    every = ["data", "reasoning", "--hops", "1", "--chains", "1", "--names", "3", "--n", "50", "--seed", "2"]
    assert runner.invoke(app, [*every, "--out", str(train), "--force"]).exit_code == 0  # all 6 problems
    full = runner.invoke(app, [*every, "--exclude", str(train), "--out", str(test), "--force"])
    assert "outside the excluded ones" in one_red_line(full)


def test_problem_rows_train_on_the_answer_only(tmp_path, tokenizer):
    path = tmp_path / "p.jsonl"
    write_problems(make_problems(ChainTask(), [1, 2], 6, 0), path)
    rows = training_sequences(path, tokenizer, seq_len=512)
    assert rows.targets is not None and rows.sequences.shape == rows.targets.shape
    for i, line in enumerate(path.read_text().splitlines()):
        record = json.loads(line)
        prompt, answer = encode_problem(tokenizer, record["prompt"], record["answer"])
        n = len(prompt) + len(answer)
        assert rows.sequences[i, :n].tolist() == prompt + answer
        assert set(rows.sequences[i, n:].tolist()) <= {tokenizer.eos_token_id}  # right padding
        assert rows.targets[i].nonzero().flatten().tolist() == list(range(len(prompt), n))
    with pytest.raises(Exception, match="more than --seq-len"):
        PackedSequences.from_problems(path, tokenizer, 8)


def test_pretraining_on_problems_minimises_the_answer_loss_only(tmp_path, tokenizer):
    """The pretraining loss on a problem file is the cross-entropy of the targets alone."""
    from melt_core.checkpoints.random_model import init_weights, ouro_config_for
    from melt_core.models import OuroForCausalLM
    from melt_core.training.pretrain import LoopLMLoss, PretrainSettings

    path = tmp_path / "p.jsonl"
    write_problems(make_problems(ChainTask(), [1, 2], 4, 0), path)
    rows = training_sequences(path, tokenizer, 512)
    model = OuroForCausalLM(
        ouro_config_for(
            tokenizer,
            torch.float32,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            total_ut_steps=2,
        )
    )
    init_weights(model, 0)
    loss, parts = LoopLMLoss(model, PretrainSettings(preset="tiny", loops=2))(rows.sequences, rows.targets)
    hidden, _ = model.forward_hidden(rows.sequences)
    by_hand = []
    for h in hidden:
        logits = model.lm_head(h[:, :-1])[rows.targets[:, 1:]]
        by_hand.append(F.cross_entropy(logits, rows.sequences[:, 1:][rows.targets[:, 1:]]))
    assert torch.allclose(loss, torch.stack(by_hand).mean(), atol=1e-6)


def _alone(model, prompt: list[int], answer: list[int], loops: int):
    """Per loop (log-probs of the answer tokens, (len, V)) of one problem alone, without a cache: the
    cache-less forward with the chunks decoding uses (prefill chunks ending at the prompt's end,
    then one chunk per answer token)."""
    ids = torch.tensor([prompt + answer[:-1]])
    kwargs = {}
    if is_melt(model):
        kwargs["chunk_size"] = chunk_lengths(len(prompt), model.config.melt.chunk_size, "end") + [1] * (len(answer) - 1)
    hidden, _ = model.forward_hidden(ids, loops=loops, **kwargs)
    return [F.log_softmax(model.lm_head(h[0, len(prompt) - 1 :]).float(), -1) for h in hidden]


@pytest.mark.parametrize("name", ["tiny_ckpt", "melt_ckpt"])
def test_answer_scores_equal_a_hand_computation(name, request):
    """Greedy flags and answer NLL per loop, batched and left-padded through the cache, equal each
    problem scored alone by the cache-less forward; answers that are the model's own argmax chain
    count as solved, one wrong token makes them unsolved."""
    model = load_model(request.getfixturevalue(name), dtype="fp32")
    rng = random.Random(0)
    loops = model.config.total_ut_steps
    pairs = []
    for length in (9, 14, 5, 11):
        prompt = [rng.randrange(3, 300) for _ in range(length)]
        greedy = []
        for _ in range(3):  # the model's own greedy continuation at the last loop
            greedy.append(int(_alone(model, prompt, greedy + [0], loops)[-1][-1].argmax()))
        pairs += [(prompt, greedy), (prompt, greedy[:2] + [(greedy[2] + 1) % 300])]
    scores = answer_scores(model, pairs, loops)
    for (prompt, answer), (flags, nll) in zip(pairs, scores, strict=True):
        logp = _alone(model, prompt, answer, loops)
        target = torch.tensor(answer)
        for t in range(loops):
            assert flags[t] == bool((logp[t].argmax(-1) == target).all())
            assert nll[t] == pytest.approx(-float(logp[t].gather(-1, target[:, None]).sum()), abs=1e-4)
    assert [flags[-1] for flags, _ in scores] == [True, False] * 4


def test_melt_eval_on_a_problem_file_reports_accuracy_per_loop(tmp_path, melt_ckpt):
    path = tmp_path / "p.jsonl"
    write_problems(make_problems(ChainTask(), [1, 3], 10, 0), path)
    model, tokenizer = load_model(melt_ckpt, dtype="fp32"), load_tokenizer(melt_ckpt)
    result = runner.invoke(app, ["eval", "problems", str(melt_ckpt), "--data", str(path), "--loops", "2,4", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report["results"]) == {"2", "4"} and report["sequences"] == 10
    by_loop = report["results"]["4"]
    assert [r["loop"] for r in by_loop] == [1, 2, 3, 4]
    assert set(by_loop[0]["accuracy_by_hops"]) == {"1", "3"}
    records = [json.loads(line) for line in path.read_text().splitlines()]
    pairs = [encode_problem(tokenizer, r["prompt"], r["answer"]) for r in records]
    flags = [f for f, _ in answer_scores(model, pairs, 4)]
    assert by_loop[-1]["accuracy"] == pytest.approx(sum(f[-1] for f in flags) / 10)
    # the one-command spelling picks the problems subcommand from the file, with a note
    table = runner.invoke(app, ["eval", str(melt_ckpt), "--data", str(path), "--limit", "4"])
    assert table.exit_code == 0 and "accuracy" in table.stdout and "3 hops" in table.stdout
    assert "melt eval problems" in table.stderr
    teacher = runner.invoke(app, ["eval", "problems", str(melt_ckpt), "--data", str(path), "--teacher", "x"])
    assert teacher.exit_code == 2 and "--teacher" in teacher.stderr  # not an option of problem scoring


def test_the_built_in_reasoning_model_needs_its_loops(tmp_path):
    """The shipped `reasoning` model: at its trained loop count far more accurate than at 1 loop."""
    path = tmp_path / "p.jsonl"
    write_problems(make_problems(ChainTask(), [2, 3, 4], 150, seed=123), path)
    report = evaluate_problems("reasoning", path)
    per_loop = [r.accuracy for r in next(iter(report.results.values()))]
    assert per_loop[-1] > per_loop[0] + 0.3, per_loop


def test_the_task_tokenizer_makes_every_assignment_one_token(tmp_path):
    from melt_core.checkpoints.tokenizer import UNKNOWN_WORD, word_level_tokenizer

    out = tmp_path / "p.jsonl"
    args = ["data", "reasoning", "--n", "20", "--out", str(out), "--tokenizer-out", str(tmp_path / "tok")]
    assert runner.invoke(app, args).exit_code == 0
    tokenizer = load_tokenizer(tmp_path / "tok")
    assert tokenizer.get_vocab() == word_level_tokenizer(ChainTask().vocabulary()).get_vocab()
    unknown = tokenizer.convert_tokens_to_ids(UNKNOWN_WORD)
    for line in out.read_text().splitlines():
        record = json.loads(line)
        prompt, answer = encode_problem(tokenizer, record["prompt"], record["answer"])
        assert len(prompt) == len(record["prompt"].split()) and unknown not in prompt
        assert tokenizer.decode(prompt) == record["prompt"]
        assert answer == [tokenizer.convert_tokens_to_ids(record["answer"])]


def test_curriculum_files_order_hop_counts_in_stages():
    problems = make_problems(ChainTask(), [3, 1, 2], 12, 0, curriculum=True)
    assert [p.hops for p in problems] == [1, 1, 1, 1, 1, 2, 1, 2, 1, 2, 3, 1]


def test_pretrain_and_distill_on_a_problem_file_in_file_order(tmp_path):
    """`melt pretrain` on a curriculum file with the task's tokenizer, then phase 1 + 2 from it;
    file order serves the rows as written."""
    data, tok = tmp_path / "train.jsonl", tmp_path / "tok"
    args = ["data", "reasoning", "--hops", "1-2", "--curriculum", "--n", "32", "--out", str(data)]
    assert runner.invoke(app, [*args, "--tokenizer-out", str(tok)]).exit_code == 0
    run = tmp_path / "teacher"
    result = runner.invoke(
        app,
        [
            "pretrain",
            "--data",
            str(data),
            "--eval-data",
            str(data),
            "--tokenizer",
            str(tok),
            "--out",
            str(run),
            "--preset",
            "tiny",
            "--loops",
            "2",
            "--steps",
            "3",
            "--micro-batch",
            "8",
            "--data-order",
            "file",
        ],
    )
    assert result.exit_code == 0, result.output
    config = json.loads((run / "run_config.json").read_text())
    rows = training_sequences(data, load_tokenizer(run), 512)
    # rows are as long as the longest problem (3 chains of 2 assignments, the query, the answer), not
    # --seq-len's 256
    assert config["data_order"] == "file" and config["seq_len"] == rows.seq_len == 8
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "loss_loop2" in metrics[-1]["eval"]
    ordered = dataclasses.replace(rows, ordered=True)
    assert torch.equal(ordered.batch(1, 8), rows.sequences[8:16]) and torch.equal(
        ordered.batch(4, 8), rows.sequences[:8]
    )
    melt = tmp_path / "melt"
    assert runner.invoke(app, ["convert", str(run), str(melt), "--chunk-size", "4"]).exit_code == 0
    result = runner.invoke(
        app,
        [
            "distill",
            "--phase",
            "all",
            str(melt),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "student"),
            "--steps",
            "2",
            "--micro-batch",
            "8",
        ],
    )
    assert result.exit_code == 0, result.output
    report = evaluate_problems(tmp_path / "student" / "phase2", data, limit=8)
    assert 0.0 <= next(iter(report.results.values()))[-1].accuracy <= 1.0
