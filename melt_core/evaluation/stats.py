"""Bootstrap intervals for accuracies measured over training seeds and held-out problems.

An arm's scores are nested as ``[seed][test file][problem]`` (0/1 correctness, or any number): one
seed for a training-free model, one per training seed for a trained recipe. Its accuracy is the mean
over seeds and problems (every problem weighs the same). A bootstrap replicate resamples, with
replacement, the seeds and, within each test file, the problems; a comparison of two arms draws the
same problem indices for both (paired), and the same seed indices when both have the same seeds
(``pair_seeds``: a recipe and its ablation trained from the same seed). Intervals are percentile
intervals of the replicates. Vectorised with torch (float64, a fixed generator seed: the same
numbers on every run).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

Scores = Sequence[Sequence[Sequence[float]]]  # [seed][test file][problem]


@dataclass(frozen=True)
class Interval:
    estimate: float  # on the data as measured
    low: float
    high: float

    def excludes_zero(self) -> int:
        """+1 when the interval lies above 0, -1 when below, 0 when it contains 0."""
        return 1 if self.low > 0 else -1 if self.high < 0 else 0


def _files(scores: Scores) -> list[torch.Tensor]:
    """Per test file, a (seeds, problems) float64 tensor; checks the nesting is rectangular."""
    if not scores or not scores[0]:
        raise ValueError("scores need at least one seed and one test file")
    n_files = len(scores[0])
    if any(len(seed) != n_files for seed in scores):
        raise ValueError("every seed needs the same test files")
    out = []
    for f in range(n_files):
        rows = [list(seed[f]) for seed in scores]
        if not rows[0] or any(len(r) != len(rows[0]) for r in rows):
            raise ValueError(f"test file {f}: every seed needs the same, non-empty problems")
        out.append(torch.tensor(rows, dtype=torch.float64))
    return out


def _problem_weights(n: int, replicates: int, gen: torch.Generator) -> torch.Tensor:
    """(replicates, n): how often each of n problems is drawn in each replicate (n draws)."""
    idx = torch.randint(0, n, (replicates, n), generator=gen)
    return torch.zeros(replicates, n, dtype=torch.float64).scatter_add_(
        1, idx, torch.ones_like(idx, dtype=torch.float64)
    )


def _seed_weights(s: int, replicates: int, gen: torch.Generator, resample: bool) -> torch.Tensor:
    """(replicates, s): how often each seed is drawn (all ones when not resampled or s == 1)."""
    if not resample or s == 1:
        return torch.ones(replicates, s, dtype=torch.float64)
    return _problem_weights(s, replicates, gen)


def _means(files: list[torch.Tensor], problem_w: list[torch.Tensor], seed_w: torch.Tensor) -> torch.Tensor:
    """(replicates,) weighted means: per file, per seed, the problem-weighted mean; files weighted by
    their problem counts; seeds by their draw counts."""
    total = sum(f.shape[1] for f in files)
    per_seed = sum(pw @ f.T for f, pw in zip(files, problem_w, strict=True)) / total  # (R, S)
    return (per_seed * seed_w).sum(1) / seed_w.sum(1)


def _percentiles(values: torch.Tensor, level: float) -> tuple[float, float]:
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    low, high = torch.quantile(values, q).tolist()
    return low, high


def _check(replicates: int, level: float) -> None:
    if replicates < 1:
        raise ValueError(f"replicates must be >= 1, got {replicates}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")


def mean_of(scores: Scores) -> float:
    """The arm's accuracy: the mean over seeds and problems."""
    files = _files(scores)
    return float(sum(f.sum() for f in files) / sum(f.numel() for f in files))


def bootstrap_mean_interval(
    scores: Scores, *, replicates: int = 2000, seed: int = 0, level: float = 0.95, resample_seeds: bool = True
) -> Interval:
    """The arm's mean and its ``level`` percentile interval over seeds and problems."""
    _check(replicates, level)
    files = _files(scores)
    gen = torch.Generator().manual_seed(seed)
    seed_w = _seed_weights(files[0].shape[0], replicates, gen, resample_seeds)
    problem_w = [_problem_weights(f.shape[1], replicates, gen) for f in files]
    return Interval(mean_of(scores), *_percentiles(_means(files, problem_w, seed_w), level))


def paired_bootstrap_difference(
    a: Scores,
    b: Scores,
    *,
    replicates: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    resample_seeds: bool = True,
    pair_seeds: bool | None = None,
) -> Interval:
    """mean(a) - mean(b) and its ``level`` percentile interval. Both arms need the same test files
    and problems (in the same order): each replicate draws one set of problem indices per file for
    both. Seeds are resampled per arm (an arm of one seed keeps it); ``pair_seeds`` (default: when
    both have the same number of seeds, more than one) draws the same seed indices for both, seed
    i of ``a`` going with seed i of ``b``."""
    _check(replicates, level)
    fa, fb = _files(a), _files(b)
    if [f.shape[1] for f in fa] != [f.shape[1] for f in fb]:
        raise ValueError("both arms need the same test files with the same numbers of problems")
    sa, sb = fa[0].shape[0], fb[0].shape[0]
    if pair_seeds is None:
        pair_seeds = sa == sb and sa > 1
    if pair_seeds and sa != sb:
        raise ValueError(f"pair_seeds needs the same number of seeds in both arms, got {sa} and {sb}")
    gen = torch.Generator().manual_seed(seed)
    wa = _seed_weights(sa, replicates, gen, resample_seeds)
    wb = wa if pair_seeds else _seed_weights(sb, replicates, gen, resample_seeds)
    problem_w = [_problem_weights(f.shape[1], replicates, gen) for f in fa]
    diff = _means(fa, problem_w, wa) - _means(fb, problem_w, wb)
    return Interval(mean_of(a) - mean_of(b), *_percentiles(diff, level))
