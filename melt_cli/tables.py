"""Tables that fit the terminal: every header and value whole, none cut to "accu…"."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table

if TYPE_CHECKING:  # melt_core imports torch: not at import time of the CLI
    from melt_core.evaluation import EvalReport

Column = tuple[str, list[str]]  # header, one value per row


def _width(column: Column) -> int:
    header, values = column
    return max(len(header), *(len(v) for v in values))


def table_width(columns: list[Column]) -> int:
    """Columns of a rich ``Table`` with the default box and padding: a border, then one space either
    side of each column and a border after it."""
    return 1 + sum(_width(c) + 3 for c in columns)


def whole_table(title: str, columns: list[Column]) -> Table:
    """A right-aligned table whose headers and values are never wrapped or cut (``no_wrap``, each
    column at least as wide as its widest header or value)."""
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column[0], justify="right", no_wrap=True, min_width=_width(column))
    for row in zip(*(values for _, values in columns)):
        table.add_row(*row)
    return table


def split_columns(key: Column, columns: list[Column], width: int) -> list[list[Column]]:
    """``columns`` in groups that each fit ``width`` after the ``key`` column (at least one each)."""
    groups: list[list[Column]] = []
    for column in columns:
        if groups and table_width([key, *groups[-1], column]) <= width:
            groups[-1].append(column)
        else:
            groups.append([column])
    return groups


def problem_tables(report: EvalReport, width: int) -> list[Table]:
    """``melt eval problems``: per loop count, the loop, accuracy and answer loss of every loop and
    its accuracy per hop count. One table where it fits ``width``; else the per-hop accuracies follow
    in tables of their own (the loop column repeated), so that no header or value is cut."""
    from melt_core.words import plural

    tables = []
    for count, results in report.results.items():
        title = (
            f"{report.checkpoint} ({report.model_type}) on {report.data}: {plural(report.sequences, 'problem')}, "
            f"{plural(count, 'loop')}"
        )
        key: Column = ("loop", [str(r.loop) for r in results])
        main: list[Column] = [
            key,
            ("accuracy", [f"{r.accuracy:.1%}" for r in results]),
            ("answer loss", [f"{r.loss:.4f}" for r in results]),
        ]
        by_hops = [r.accuracy_by_hops or {} for r in results]
        hops: list[Column] = [
            (f"{k} hop" if str(k) == "1" else f"{k} hops", [f"{b[k]:.0%}" for b in by_hops])
            for k in results[0].accuracy_by_hops or {}
        ]
        if table_width(main + hops) <= width:
            tables.append(whole_table(title, main + hops))
            continue
        tables.append(whole_table(title, main))
        for group in split_columns(key, hops, width):
            tables.append(whole_table(f"accuracy by hop count ({plural(count, 'loop')})", [key, *group]))
    return tables
