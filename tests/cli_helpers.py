"""Helpers shared by the CLI tests."""

from __future__ import annotations


def one_red_line(result) -> str:
    """The error line of a failed CLI run: exit status 1, one `error:` line first, no traceback."""
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert lines[0].startswith("error:") and "Traceback" not in result.stderr
    return lines[0]
