"""``melt data``: make datasets melt generates itself (``melt data reasoning``)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated

import typer

from melt_core.checkpoints.tokenizer import save_tokenizer, word_level_tokenizer
from melt_core.data import read_problems
from melt_core.errors import InvalidArgumentError
from melt_core.outputs import atomic_directory, check_output, writing
from melt_core.tasks import ChainTask, make_problems, write_problems
from melt_core.tasks.chains import parse_hops, teacher_training_problems

from .. import console
from ..options import int_parser

EPILOG = """Examples:

  melt data reasoning --hops 1-5 --curriculum --n 768000 --out train.jsonl --tokenizer-out chains-tokenizer
  melt pretrain --data train.jsonl --data-order file --tokenizer chains-tokenizer --out runs/reasoning

  melt data reasoning --hops 1-5 --n 1000 --seed 1 --exclude train.jsonl --exclude-builtin --out test.jsonl

  melt eval problems reasoning --data test.jsonl --loops 1,2,4,8
"""

data_app = typer.Typer(help="Make datasets melt generates itself, offline and seeded.", no_args_is_help=True)


@data_app.command(epilog=EPILOG)
def reasoning(
    out: Annotated[Path, typer.Option("--out", help="Output .jsonl file (one problem per line).")],
    hops: Annotated[str, typer.Option(help="Hop counts: 4, a range 1-5, or a list 1,2,6 (equal shares).")] = "1-5",
    n: Annotated[int, typer.Option("--n", help="Number of problems.")] = 1000,
    seed: Annotated[
        int,
        typer.Option(parser=int_parser("--seed"), metavar="INTEGER", help="Seed: the same seed writes the same file."),
    ] = 0,
    curriculum: Annotated[
        bool,
        typer.Option(
            "--curriculum",
            help="Write the problems in stages of equal size, stage j with the j smallest hop counts "
            "(train on it with --data-order file).",
        ),
    ] = False,
    chains: Annotated[int, typer.Option(help="Chains per problem: the queried one and distractors.")] = (
        ChainTask.chains
    ),
    names: Annotated[int, typer.Option(help="Variable names to draw from (the first N letters).")] = ChainTask.names,
    tokenizer_out: Annotated[
        Path | None,
        typer.Option(help="Also write the task's word-level tokenizer (one token per assignment) to this folder."),
    ] = None,
    exclude: Annotated[
        list[Path] | None,
        typer.Option(
            help="A problem file (repeatable) none of whose problems may be written, in any statement order: "
            "held-out files that share no problem with training files."
        ),
    ] = None,
    exclude_builtin: Annotated[
        bool,
        typer.Option(
            "--exclude-builtin",
            help="Also exclude the built-in `reasoning` model's training problems (docs/reasoning.md).",
        ),
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing OUT (and --tokenizer-out).")] = False,
) -> None:
    """Multi-hop variable-chain problems: from the queried name, follow K assignments to the end of its
    chain (a name never assigned), past distractor chains of the same length (records: prompt, answer, hops)."""
    if not out.name.endswith(".jsonl"):
        raise InvalidArgumentError(f"--out must be a .jsonl file, got {out}")
    if out.exists() and not force:
        raise InvalidArgumentError(f"{out} exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise InvalidArgumentError(f"cannot write {out}: {out.parent} is not a folder")
    check_output(out, force)
    if tokenizer_out is not None:
        check_output(tokenizer_out, force)
    task = ChainTask(chains=chains, names=names)
    excluded = [record for path in exclude or [] for record in read_problems(path)]
    if exclude_builtin:
        excluded += teacher_training_problems()
    problems = make_problems(task, parse_hops(hops), n, seed, curriculum=curriculum, exclude=excluded)
    if tokenizer_out is not None:  # first: replacing it must not delete an OUT written inside it
        with atomic_directory(tokenizer_out, force) as tmp, writing(tokenizer_out):
            save_tokenizer(word_level_tokenizer(task.vocabulary()), tmp)
        console.err.print(f"wrote the task's tokenizer ({len(task.vocabulary())} words) to {tokenizer_out}")
    write_problems(problems, out)
    shares = Counter(p.hops for p in problems)
    spread = ", ".join(f"{k} hops: {shares[k]}" for k in sorted(shares))
    example = problems[0]
    console.err.print(
        f"wrote {len(problems)} problems to {out} ({spread}); e.g. {example.prompt!r} -> {example.answer!r}"
    )


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
