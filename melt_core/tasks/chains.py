"""Variable-chain problems: follow k assignments to the chain's end, past distractor chains.

A problem is a shuffled list of assignments and a query::

    e=r q=b b=k d=e x=q f=d x?      answer: k   (x -> q -> b -> k: 3 hops)

A chain ends in a name that is never assigned (its *end*: ``k`` and ``r`` above), and the answer is
the end the queried name leads to. Every problem has ``chains`` chains, so reading off any end is
right 1/chains of the time: the answer is only reachable by following the queried chain, one
assignment per hop. The number of assignments is fixed (``ChainTask.statements``), so problems of
every hop count have the same length and difficulty is depth alone, not length.

Why this task measures depth: each hop is one content lookup (find the assignment whose left side
is the current name, read its right side), and a lookup needs the result of the one before it, so
a transformer that follows the chain hop by hop needs about one attention layer per hop; even with
pointer doubling, k-hop lookup needs depth growing like log k (Sanford, Hsu and Telgarsky 2024,
"Transformers, parallel computation, and logarithmic depth"). Looped transformers solve such
multi-hop tasks by reusing their layers, with accuracy tracking the effective depth (Saunshi et al.
2025, "Reasoning with latent thoughts: on the power of looped transformers", on p-hop induction).
Assignments are shuffled, so a causal model cannot resolve chains as it reads them: the work is
done at the query, in depth.

Two choices make the task learnable by a small two-layer model on a CPU (docs/reasoning.md). Every
assignment is one word, and so one token of the task's word-level tokenizer
(``ChainTask.vocabulary``): a hop is exactly one attention lookup, and prompts are short. And chain
ends are names, not a separate kind of value: every assignment ``a=b`` is the last hop of some
one-hop problem, so one-hop training teaches the lookup of every assignment, which longer chains
then reuse (with digit ends, the assignments between names would never be a last hop, so one-hop
training would never teach their lookup).
"""

from __future__ import annotations

import json
import os
import random
import string
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidArgumentError
from ..outputs import remove_stale_siblings, writing

NAMES = string.ascii_lowercase
STATEMENT_SEP, QUERY_MARK = " ", "?"


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str
    hops: int

    def to_json(self) -> dict[str, object]:
        return {"prompt": self.prompt, "answer": self.answer, "hops": self.hops}


@dataclass(frozen=True)
class ChainTask:
    """The shape of a problem family: ``chains`` chains (the queried one and distractors) over
    ``statements`` assignments in all."""

    statements: int = 9
    chains: int = 3
    names: int = 12  # the first ``names`` letters name the variables

    def __post_init__(self) -> None:
        if not 2 <= self.names <= len(NAMES):
            raise InvalidArgumentError(f"--names must be 2..{len(NAMES)}, got {self.names}")
        if self.chains < 1:
            raise InvalidArgumentError(f"--chains must be >= 1, got {self.chains}")
        if not self.chains <= self.statements <= self.names - self.chains:
            raise InvalidArgumentError(
                f"--statements must be {self.chains}..{self.names - self.chains} (at least one per chain; every "
                f"assigned name and every chain end is one of the {self.names} names), got {self.statements}"
            )

    @property
    def max_hops(self) -> int:
        """The queried chain's longest length: every distractor chain needs one statement."""
        return self.statements - (self.chains - 1)

    def check_hops(self, hops: int) -> None:
        if not 1 <= hops <= self.max_hops:
            raise InvalidArgumentError(
                f"--hops must be 1..{self.max_hops} for {self.statements} statements in {self.chains} chains, "
                f"got {hops}"
            )

    def problem(self, hops: int, rng: random.Random) -> Problem:
        """One problem whose queried chain has ``hops`` assignments."""
        self.check_hops(hops)
        # lengths of the distractor chains: a random composition of the remaining statements
        rest, others = self.statements - hops, self.chains - 1
        cuts = sorted(rng.sample(range(1, rest), others - 1)) if others > 1 else []
        lengths = [hops] + [b - a for a, b in zip([0, *cuts], [*cuts, rest], strict=True)] if others else [hops]
        names = rng.sample(NAMES[: self.names], self.statements + self.chains)
        statements, heads, ends = [], [], []
        for length in lengths:  # a chain of `length` assignments has length + 1 names, its end first
            chain, names = names[: length + 1], names[length + 1 :]
            statements += [f"{b}={a}" for a, b in zip(chain, chain[1:], strict=False)]
            ends.append(chain[0])
            heads.append(chain[-1])
        rng.shuffle(statements)
        prompt = STATEMENT_SEP.join([*statements, heads[0] + QUERY_MARK])
        return Problem(prompt=prompt, answer=ends[0], hops=hops)

    def vocabulary(self) -> list[str]:
        """Every word a prompt or an answer is made of: the assignments ``a=b``, the queries ``a?``
        and the names (answers)."""
        names = NAMES[: self.names]
        assignments = [f"{a}={b}" for a in names for b in names if a != b]
        return assignments + [a + QUERY_MARK for a in names] + list(names)


# The built-in `reasoning` model's task: the defaults, trained on 1..5 hops (docs/reasoning.md).
TRAINED_HOPS = range(1, 6)


MAX_HOP_SPAN = 1000  # far beyond any chain a problem can hold (ChainTask.check_hops bounds each count)


def parse_hops(spec: str) -> list[int]:
    """``"4"`` -> [4]; ``"1-4"`` -> [1, 2, 3, 4]; ``"1,2,6"`` -> [1, 2, 6]."""
    hops: list[int] = []
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            first, last = int(lo), int(hi or lo)
            if last - first > MAX_HOP_SPAN:  # refused before a list of that size is built
                raise InvalidArgumentError(f"--hops {part.strip()} spans more than {MAX_HOP_SPAN} hop counts")
            hops += list(range(first, last + 1))
    except ValueError:
        raise InvalidArgumentError(f"--hops takes numbers and ranges like 4, 1-4 or 1,2,6; got {spec!r}") from None
    if not hops:
        raise InvalidArgumentError(f"--hops names no hop count: {spec!r}")
    return hops


def make_problems(task: ChainTask, hops: Iterable[int], n: int, seed: int, curriculum: bool = False) -> list[Problem]:
    """``n`` problems, hop counts cycling through ``hops`` (equal shares), deterministic in ``seed``.

    ``curriculum``: in stages of equal size, stage j cycling through the j smallest hop counts, so
    that a model trained in file order (``--data-order file``) meets longer chains only once it
    follows shorter ones (in melt's probes, models trained on all hop counts from the start stayed at chance).
    """
    hops = sorted(set(hops)) if curriculum else list(hops)
    for k in hops:
        task.check_hops(k)
    if n < 1:
        raise InvalidArgumentError(f"--n must be >= 1, got {n}")
    rng = random.Random(f"melt-chains:{seed}")  # a string seed hashes the same on every platform
    if not curriculum:
        return [task.problem(hops[i % len(hops)], rng) for i in range(n)]
    stage = -(-n // len(hops))
    return [task.problem(hops[(i % stage) % (i // stage + 1)], rng) for i in range(n)]


def write_problems(problems: list[Problem], out: str | os.PathLike) -> None:
    """One JSON object per line (``prompt``, ``answer``, ``hops``), written atomically: a failed write
    (a full disk) is one error naming ``out`` and leaves no temporary file."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with writing(out):
        remove_stale_siblings(out)  # what a killed run left
        try:
            with open(tmp, "w") as f:
                for p in problems:
                    f.write(json.dumps(p.to_json()) + "\n")
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
