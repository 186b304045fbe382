"""Variable-chain problems: follow k assignments to the chain's end, past distractor chains of the
same length.

A problem is a shuffled list of assignments and a query::

    j=o b=n l=e r=j e=h n=k l?      answer: h   (l -> e -> h: 3 chains of 2 hops)

A chain ends in a name that is never assigned (its *end*: ``o``, ``k`` and ``h`` above), and the
answer is the end the queried name leads to. A problem of k hops has ``chains`` chains of k
assignments each, the query being the head of one of them, so that nothing but following the
queried chain for all k hops separates its end from the others:

- following the other chains (from their heads, or backwards from their ends) for fewer than k
  hops reaches no end and rules none out;
- every name in a problem is a different variable, assignments are shuffled and names drawn at
  random: no position, letter or "the name never assigned" picks the answer better than chance
  (1/``chains``). tests/test_reasoning_shortcuts.py checks this with independent solvers.

The prompt's length (``chains x k`` assignments) says how deep the query is, which does not say
which end is the answer. (The generator before 2026-12-05 drew distractor chains from the
statements a query left over, so long queries had short distractors, and one hop of elimination
solved every 7-hop problem: docs/reasoning.md.)

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
    """The shape of a problem family: ``chains`` chains (the queried one and distractors), each as
    long as the query, over ``names`` variable names (the first ``names`` letters)."""

    chains: int = 3
    names: int = 18

    def __post_init__(self) -> None:
        if not 2 <= self.names <= len(NAMES):
            raise InvalidArgumentError(f"--names must be 2..{len(NAMES)}, got {self.names}")
        if not 1 <= self.chains <= self.names // 2:
            raise InvalidArgumentError(
                f"--chains must be 1..{self.names // 2} for {self.names} names, got {self.chains}"
            )

    @property
    def max_hops(self) -> int:
        """The longest query: ``chains`` chains of k assignments use ``chains x (k + 1)`` names."""
        return self.names // self.chains - 1

    def check_hops(self, hops: int) -> None:
        if not 1 <= hops <= self.max_hops:
            raise InvalidArgumentError(
                f"--hops must be 1..{self.max_hops} for {self.chains} chains over {self.names} names, got {hops}"
            )

    def problem(self, hops: int, rng: random.Random) -> Problem:
        """One problem: ``chains`` chains of ``hops`` assignments each, the query the first one's head."""
        self.check_hops(hops)
        names = rng.sample(NAMES[: self.names], self.chains * (hops + 1))
        statements, heads, ends = [], [], []
        for c in range(self.chains):  # a chain of `hops` assignments has hops + 1 names, its end first
            chain = names[c * (hops + 1) : (c + 1) * (hops + 1)]
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


MAX_REDRAWS = 10_000  # draws of one problem before the excluded ones are deemed to cover the task


def make_problems(
    task: ChainTask,
    hops: Iterable[int],
    n: int,
    seed: int,
    curriculum: bool = False,
    exclude: Iterable[Problem] = (),
) -> list[Problem]:
    """``n`` problems, hop counts cycling through ``hops`` (equal shares), deterministic in ``seed``.

    ``curriculum``: in stages of equal size, stage j cycling through the j smallest hop counts, so
    that a model trained in file order (``--data-order file``) meets longer chains only once it
    follows shorter ones (in melt's probes, models trained on all hop counts from the start stayed at chance).
    ``exclude``: problems (e.g. a model's training set) none of the new ones may be, by
    ``canonical_form``: a drawn problem that is one of them is drawn again.
    """
    hops = sorted(set(hops)) if curriculum else list(hops)
    for k in hops:
        task.check_hops(k)
    if n < 1:
        raise InvalidArgumentError(f"--n must be >= 1, got {n}")
    rng = random.Random(f"melt-chains:{seed}")  # a string seed hashes the same on every platform
    excluded = {canonical_form(p.prompt) for p in exclude}

    def draw(k: int) -> Problem:
        for _ in range(MAX_REDRAWS):
            problem = task.problem(k, rng)
            if not excluded or canonical_form(problem.prompt) not in excluded:
                return problem
        raise InvalidArgumentError(
            f"no {k}-hop problem outside the excluded ones in {MAX_REDRAWS} draws: they hold (nearly) every "
            "problem of this shape; use more --names"
        )

    if not curriculum:
        return [draw(hops[i % len(hops)]) for i in range(n)]
    stage = -(-n // len(hops))
    return [draw(hops[(i % stage) % (i // stage + 1)]) for i in range(n)]


def canonical_form(prompt: str) -> str:
    """A problem's identity, whatever order its statements were written in: the sorted statements,
    then the query."""
    *statements, query = prompt.split(STATEMENT_SEP)
    return STATEMENT_SEP.join([*sorted(statements), query])


def teacher_training_problems() -> list[Problem]:
    """The built-in ``reasoning`` model's training problems (docs/reasoning.md: 768,000 problems of
    1-5 hops, a curriculum, seed 0), for held-out sets that must exclude them."""
    return make_problems(ChainTask(), TRAINED_HOPS, 768_000, seed=0, curriculum=True)


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
