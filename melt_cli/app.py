"""The ``melt`` Typer application: one top-level handler turns MeltError into one red line."""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup

from melt_core import __version__
from melt_core.errors import MeltError

from . import console

DEBUG_ENV = "MELT_DEBUG"


class MeltGroup(TyperGroup):
    """Catches melt's typed errors once for every subcommand (CliRunner tests included)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MeltError as e:
            if os.environ.get(DEBUG_ENV):
                raise
            console.err.print(f"[bold red]error:[/] {e}", markup=True, soft_wrap=True, highlight=False)
            console.err.print(f"[dim](set {DEBUG_ENV}=1 for the traceback)[/]")
            raise typer.Exit(1) from None


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
) -> None:
    """melt: memory-efficient looped language models (Ouro -> MELT)."""


def _register() -> None:
    from .commands import convert, evaluate, generate, info, pretrain, profile, quickstart, random_model, train

    for module in (quickstart, info, convert, train, evaluate, pretrain, generate, profile, random_model):
        module.register(app)


_register()


def main() -> None:
    app(prog_name="melt")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
