"""The ``melt`` Typer application: one top-level handler turns MeltError into one red line."""

from __future__ import annotations

import os
import re
import signal
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.text import Text
from typer.core import TyperGroup

from melt_core import __version__
from melt_core.errors import MeltError, MeltWarning

from . import console

DEBUG_ENV = "MELT_DEBUG"
# A ``[...]`` that rich (``rich_markup_mode="rich"``) would read as a markup tag and drop: ``melt[eval]``,
# ``[default: 4]`` (rich's own tag pattern), unless already escaped (``\[``).
_MARKUP_TAG = re.compile(r"(?<!\\)(\[[a-z#/@][^[]*?\])")


def _fail(message: str, status: int) -> typer.Exit:
    """One red line on stderr (the message is printed as text, never as rich markup)."""
    where = f"[rank {console.RANK}] " if console.RANK else ""
    console.rank_err.print(Text.assemble(("error:", "bold red"), " ", where, message), soft_wrap=True, highlight=False)
    console.rank_err.print(f"[dim](set {DEBUG_ENV}=1 for the traceback)[/]")
    return typer.Exit(status)


def _os_error(e: OSError) -> str:
    """``cannot write /x/y: Read-only file system``-style text of a file-system error."""
    where = f" {e.filename}" if e.filename else ""
    return f"{e.strerror or e}:{where}" if e.strerror else str(e)


def _hide_flag_types(command: Any, ctx: typer.Context) -> None:
    """Flags take no value: show no ``<bool>`` type next to them in --help (sub-groups included)."""
    for param in [*command.params, command.get_help_option(ctx)]:
        if param is not None and getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        _hide_flag_types(sub, ctx)


def _escape_brackets(command: Any) -> None:
    """Help texts (docstrings, epilogs, option help) print as written: their ``[...]`` are escaped
    for rich, once, for the command, its parameters and its subcommands."""
    for obj in [command, *command.params]:
        for attr in ("help", "short_help", "epilog"):
            text = getattr(obj, attr, None)
            if isinstance(text, str):
                setattr(obj, attr, _MARKUP_TAG.sub(r"\\\1", text))
    for sub in getattr(command, "commands", {}).values():
        _escape_brackets(sub)


@contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """melt's warnings (NaN weights, ...) as one yellow ``warning:`` line each on stderr."""

    def show(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> None:
        if issubclass(category, MeltWarning):
            console.err.print(Text.assemble(("warning:", "bold yellow"), " ", str(message)), soft_wrap=True)
        else:
            shown(message, category, *args, **kwargs)

    with warnings.catch_warnings():
        shown = warnings.showwarning
        warnings.simplefilter("always", MeltWarning)
        warnings.showwarning = show
        yield


class MeltGroup(TyperGroup):
    """Turns melt's typed errors, file-system errors and Ctrl-C into one red line, and melt's warnings
    into one yellow line, once for every subcommand (CliRunner tests included)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.rich_markup_mode == "rich":
            _escape_brackets(self)  # the whole tree: typer makes the subcommands first

    def get_command(self, ctx: typer.Context, name: str) -> Any:
        command = super().get_command(ctx, name)
        if command is not None:
            _hide_flag_types(command, ctx)
        return command

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            with _warnings_as_lines():
                return super().invoke(ctx)
        except BrokenPipeError:  # the reader went away (``melt ... | head``): stop quietly, as cat does
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
            raise typer.Exit(141) from None
        except (MeltError, OSError, KeyboardInterrupt, Terminated, MemoryError, RuntimeError) as e:
            if os.environ.get(DEBUG_ENV):
                raise
            if isinstance(e, KeyboardInterrupt):
                raise _fail("interrupted (Ctrl-C); nothing was left half-written", 130) from None
            if isinstance(e, Terminated):
                raise _fail("terminated (SIGTERM); nothing was left half-written", 143) from None
            if isinstance(e, MemoryError) or "can't allocate memory" in str(e) or "out of memory" in str(e).lower():
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise _fail(f"out of memory: {first}", 1) from None
            if isinstance(e, RuntimeError):
                raise
            raise _fail(_os_error(e) if isinstance(e, OSError) else str(e), getattr(e, "exit_code", 1)) from None


app = typer.Typer(
    cls=MeltGroup,
    name="melt",
    help="melt: memory-efficient looped language models (Ouro -> MELT).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        console.out.print(f"melt {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print melt's version and exit.")
    ] = False,
    threads: Annotated[
        int | None,
        typer.Option(
            help="CPU threads for torch [default: $MELT_THREADS, else the free cores: cores less the load average, "
            "shared among the processes of an accelerate launch]."
        ),
    ] = None,
) -> None:
    """melt: memory-efficient looped language models (Ouro -> MELT)."""
    from melt_core.runtime import set_threads

    set_threads(threads)


def _register() -> None:
    from .commands import convert, data, evaluate, generate, info, pretrain, profile, quickstart, random_model, train

    for module in (quickstart, info, convert, train, evaluate, pretrain, generate, profile, random_model, data):
        module.register(app)


_register()


class Terminated(BaseException):
    """SIGTERM outside a training run (which saves a checkpoint instead): unwinds like Ctrl-C, so
    temporary outputs are removed, and exits with 143."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    app(prog_name="melt")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
