"""Result tables at 80 columns: every header and value whole (none cut to "accu…")."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from typer.testing import CliRunner

from melt_cli.app import app
from melt_cli.tables import problem_tables
from melt_core.evaluation import EvalReport
from melt_core.evaluation.problems import ProblemLoopResult

runner = CliRunner()


def _render(tables, width: int = 80) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    for table in tables:
        console.print(table)
    return console.file.getvalue()


def _report(hops: range, loops: int = 4) -> EvalReport:
    report = EvalReport("reasoning", "ouro", "a/long/path/to/problems.jsonl", 400, 100, 60, None)
    report.results[loops] = [
        ProblemLoopResult(t, 0.5 + t / 10, 0.123456 / t, 1.1, {str(h): 1 / h for h in hops})
        for t in range(1, loops + 1)
    ]
    return report


def _headers(hops: range) -> list[str]:
    return ["loop", "accuracy", "answer loss", *(f"{h} hop" if h == 1 else f"{h} hops" for h in hops)]


@pytest.mark.parametrize("hops", [range(1, 4), range(1, 8), range(1, 17)])
def test_problem_tables_fit_80_columns_with_every_header_whole(hops):
    tables = problem_tables(_report(hops), 80)
    text = _render(tables)
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    for header in _headers(hops):
        assert f" {header} " in text, header
    assert "0.1235" in text and "60.0%" in text and f" {1 / hops[-1]:.0%} " in text  # values whole too
    assert len(tables) == {3: 1, 7: 2, 16: 4}[len(hops)]  # hop columns in tables of their own where needed


def test_melt_eval_problems_at_80_columns(tmp_path, monkeypatch):
    """The command itself: `melt data reasoning --hops 1-7` (2 chains, over names the model knows), then
    `melt eval problems` at COLUMNS=80."""
    data = tmp_path / "f.jsonl"
    args = ["data", "reasoning", "--chains", "2", "--names", "16", "--hops", "1-7", "--n", "14", "--seed", "1"]
    made = runner.invoke(app, [*args, "--out", str(data)])
    assert made.exit_code == 0, made.output
    monkeypatch.setenv("COLUMNS", "80")  # rich reads it when it lays a table out
    result = runner.invoke(app, ["eval", "problems", "reasoning", "--data", str(data), "--loops", "2"])
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout and max(len(line) for line in result.stdout.splitlines()) <= 80
    for header in _headers(range(1, 8)):
        assert f" {header} " in result.stdout, header
