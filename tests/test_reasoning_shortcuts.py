"""The reasoning task has no shortcut: solvers that do not follow the queried chain for its full depth
stay at chance at every hop count, on several seeds.

The solvers are written here from the prompt text alone (statements ``a=b`` and a query ``q?``), not
from the generator's internals. Each returns, per problem, the probability that its guess is right
(a uniform pick among the candidates it keeps), so that accuracies are exact averages with no
guessing noise. Chance is 1 / the number of chain ends (names never assigned). The generator before
2026-12-05 failed ``test_no_solver_that_skips_the_queried_chain_beats_chance``: its distractor chains
were short for long queries, and one hop of elimination solved every 7-hop problem.
"""

from __future__ import annotations

from collections import Counter

import pytest

from melt_core.tasks import ChainTask, make_problems

SEEDS = (11, 777, 4242)
PER_HOP = 1000  # problems per hop count and seed: a binomial standard error of 1.5 points at p = 1/3
TOLERANCE = 0.05


def parse(prompt: str) -> tuple[list[tuple[str, str]], str]:
    *statements, query = prompt.split()
    return [tuple(s.split("=")) for s in statements], query.removesuffix("?")


def ends_of(statements: list[tuple[str, str]]) -> list[str]:
    """Names that are read but never assigned, in the order they first appear."""
    assigned = {left for left, _ in statements}
    ends: list[str] = []
    for _, right in statements:
        if right not in assigned and right not in ends:
            ends.append(right)
    return ends


def uniform_pick(candidates: list[str], answer: str) -> float:
    return 1 / len(candidates) if answer in candidates else 0.0


def eliminate(prompt: str, answer: str, depth: int) -> float:
    """Rule out the ends that other chains reach: walk forward ``depth`` hops from every head other
    than the query (a name assigned but never read), and backward ``depth`` hops from every end; an
    end whose walk meets a head other than the query belongs to another chain. Never follows the
    query itself."""
    statements, query = parse(prompt)
    forward = dict(statements)
    backward = {right: left for left, right in statements}
    read = {right for _, right in statements}
    heads = [left for left, _ in statements if left not in read and left != query]
    ends = ends_of(statements)
    ruled_out = set()
    for head in heads:
        name = head
        for _ in range(depth):
            name = forward.get(name, name)
        if name in ends:
            ruled_out.add(name)
    for end in ends:
        name = end
        for _ in range(depth):
            name = backward.get(name, name)
        if name in heads:
            ruled_out.add(end)
    kept = [e for e in ends if e not in ruled_out] or ends
    return uniform_pick(kept, answer)


def never_assigned(prompt: str, answer: str) -> float:
    """Any name that is read but never assigned (a chain end)."""
    statements, _ = parse(prompt)
    return uniform_pick(ends_of(statements), answer)


def by_position(prompt: str, answer: str, rule: str) -> float:
    """The end picked by where it is written: the first, middle or last end in the prompt, or the end
    written nearest to the query's own assignment (which reads one hop of the queried chain: a
    shortcut only for queries of 2 hops or more)."""
    statements, query = parse(prompt)
    ends = ends_of(statements)  # in prompt order
    if rule == "first":
        return float(ends[0] == answer)
    if rule == "last":
        return float(ends[-1] == answer)
    if rule == "middle":
        return float(ends[len(ends) // 2] == answer)
    where = {right: i for i, (_, right) in enumerate(statements)}
    own = next((i for i, (left, _) in enumerate(statements) if left == query), len(statements))
    nearest = min(abs(where[e] - own) for e in ends)
    return uniform_pick([e for e in ends if abs(where[e] - own) == nearest], answer)


def by_letter(prompt: str, answer: str, ranking: dict[str, int]) -> float:
    """The end whose letter was most often the answer in other problems."""
    statements, _ = parse(prompt)
    ends = ends_of(statements)
    best = max(ranking.get(e, 0) for e in ends)
    return uniform_pick([e for e in ends if ranking.get(e, 0) == best], answer)


def chance(prompt: str) -> float:
    statements, _ = parse(prompt)
    return 1 / len(ends_of(statements))


def hop_counts(task: ChainTask) -> list[int]:
    return list(range(1, task.max_hops + 1))


def accuracy(problems, solver) -> float:
    return sum(solver(p.prompt, p.answer) for p in problems) / len(problems)


def solver_accuracies(seed: int) -> dict[str, dict[int, tuple[float, float]]]:
    """solver -> hop count -> (accuracy, chance) on ``PER_HOP`` problems per hop count of ``seed``
    (the letter ranking from other problems, of seed + 1)."""
    task = ChainTask()
    ranking = Counter(p.answer for p in make_problems(task, hop_counts(task), 5000, seed + 1))
    out: dict[str, dict[int, tuple[float, float]]] = {}
    for k in hop_counts(task):
        problems = make_problems(task, [k], PER_HOP, seed)
        base = sum(chance(p.prompt) for p in problems) / len(problems)
        solvers = {
            "never assigned": never_assigned,
            "answer letter": lambda prompt, answer: by_letter(prompt, answer, ranking),
            **{
                f"position: {rule}": (lambda prompt, answer, r=rule: by_position(prompt, answer, r))
                for rule in ("first", "middle", "last", "nearest the query")
                if rule != "nearest the query" or k > 1
            },
            **{f"eliminate d={d}": (lambda prompt, answer, d=d: eliminate(prompt, answer, d)) for d in range(1, k)},
        }
        for name, solver in solvers.items():
            out.setdefault(name, {})[k] = (accuracy(problems, solver), base)
    return out


@pytest.mark.parametrize("seed", SEEDS)
def test_no_solver_that_skips_the_queried_chain_beats_chance(seed):
    results = solver_accuracies(seed)
    above = {
        (name, k): f"{acc:.1%} (chance {base:.1%})"
        for name, by_k in results.items()
        for k, (acc, base) in by_k.items()
        if abs(acc - base) > TOLERANCE
    }
    assert not above, above


def test_every_chain_is_as_long_as_the_query():
    """The distractors are as long as the queried chain, so no walk of fewer hops reaches their ends;
    the prompt's length says how deep the query is, which does not say which end is the answer."""
    task = ChainTask()
    for k in hop_counts(task):
        for p in make_problems(task, [k], 200, 5):
            statements, query = parse(p.prompt)
            assert len(statements) == task.chains * k and len(ends_of(statements)) == task.chains


def test_the_solvers_find_a_shortcut_where_there_is_one():
    """A problem whose distractor chains are single assignments is solved by elimination with one
    hop, and an end written first is found by the position rule: the solvers are not blind."""
    prompt, answer = "x=y a=b b=c c=d u=v a?", "d"
    assert eliminate(prompt, answer, 1) == 1.0
    assert by_position(prompt, answer, "first") == 0.0 and by_position("c=d a=b b=c x=y u=v a?", "d", "first") == 1.0
    assert by_letter(prompt, answer, {"d": 5, "y": 1, "v": 0}) == 1.0
    assert never_assigned(prompt, answer) == pytest.approx(1 / 3)
