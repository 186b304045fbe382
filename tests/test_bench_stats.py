"""The bootstrap statistics of benchmarks/bench_reasoning.py (melt_core.evaluation.stats)."""

from __future__ import annotations

import random

import pytest

from melt_core.evaluation.stats import bootstrap_mean_interval, mean_of, paired_bootstrap_difference


def arm(seeds: int, files: int, problems: int, p: float, rng: random.Random) -> list:
    """[seed][file][problem] 0/1 scores, each 1 with probability p."""
    return [[[float(rng.random() < p) for _ in range(problems)] for _ in range(files)] for _ in range(seeds)]


def test_mean_is_over_seeds_and_problems():
    scores = [[[1, 0, 0, 0], [1, 1, 0, 0]], [[1, 1, 1, 1], [0, 0, 0, 0]]]
    assert mean_of(scores) == pytest.approx(7 / 16)
    interval = bootstrap_mean_interval(scores, replicates=500)
    assert interval.estimate == pytest.approx(7 / 16)
    assert 0 <= interval.low <= interval.estimate <= interval.high <= 1


def test_identical_arms_differ_by_exactly_zero():
    a = arm(3, 2, 50, 0.5, random.Random(0))
    d = paired_bootstrap_difference(a, a, replicates=2000)
    assert (d.estimate, d.low, d.high) == (0.0, 0.0, 0.0)
    assert d.excludes_zero() == 0


def test_constant_offset_gives_exactly_it():
    ones = [[[1.0] * 40, [1.0] * 30]] * 3
    zeros = [[[0.0] * 40, [0.0] * 30]] * 3
    d = paired_bootstrap_difference(ones, zeros, replicates=2000)
    assert (d.estimate, d.low, d.high) == (1.0, 1.0, 1.0)
    b = arm(3, 2, 40, 0.3, random.Random(1))
    shifted = [[[x + 1 for x in f] for f in s] for s in b]
    d = paired_bootstrap_difference(shifted, b, replicates=2000)
    assert d.low == pytest.approx(1.0, abs=1e-12) and d.high == pytest.approx(1.0, abs=1e-12)


def test_a_clear_difference_excludes_zero_in_its_direction():
    rng = random.Random(2)
    good, bad = arm(3, 2, 200, 0.8, rng), arm(3, 2, 200, 0.4, rng)
    d = paired_bootstrap_difference(good, bad, replicates=2000)
    assert d.low > 0.25 and d.high < 0.55 and d.excludes_zero() == 1
    assert paired_bootstrap_difference(bad, good, replicates=2000).excludes_zero() == -1


def test_noise_contains_zero():
    rng = random.Random(3)
    a, b = arm(3, 2, 200, 0.5, rng), arm(3, 2, 200, 0.5, rng)
    d = paired_bootstrap_difference(a, b, replicates=2000)
    assert d.low < 0 < d.high and d.excludes_zero() == 0


def test_resampling_seeds_widens_the_interval_when_seeds_disagree():
    rng = random.Random(4)
    disagree = [arm(1, 2, 200, p, rng)[0] for p in (0.2, 0.5, 0.8)]  # three seeds, far apart
    baseline = arm(1, 2, 200, 0.5, rng)  # training-free: one seed
    fixed = paired_bootstrap_difference(disagree, baseline, resample_seeds=False)
    resampled = paired_bootstrap_difference(disagree, baseline)
    assert resampled.high - resampled.low > 2 * (fixed.high - fixed.low)
    alone = bootstrap_mean_interval(disagree, resample_seeds=False)
    assert bootstrap_mean_interval(disagree).high - bootstrap_mean_interval(disagree).low > alone.high - alone.low


def test_paired_seeds_cancel_a_shared_seed_effect():
    rng = random.Random(5)
    base = [arm(1, 1, 200, p, rng)[0] for p in (0.1, 0.5, 0.9)]  # the seed decides most of the score
    plus = [[[min(1.0, x + (i % 10 == 0)) for i, x in enumerate(f)] for f in s] for s in base]
    paired = paired_bootstrap_difference(plus, base)
    unpaired = paired_bootstrap_difference(plus, base, pair_seeds=False)
    assert paired.low > 0 and unpaired.low < 0 < unpaired.high


def test_same_seed_gives_the_same_interval_and_inputs_are_checked():
    a = arm(3, 2, 30, 0.5, random.Random(6))
    b = arm(1, 2, 30, 0.4, random.Random(7))
    assert paired_bootstrap_difference(a, b, seed=1) == paired_bootstrap_difference(a, b, seed=1)
    with pytest.raises(ValueError):
        paired_bootstrap_difference(a, [[f[:-1] for f in s] for s in a])  # other problems
    with pytest.raises(ValueError):
        paired_bootstrap_difference(a, b, pair_seeds=True)  # 3 seeds vs 1
    with pytest.raises(ValueError):
        bootstrap_mean_interval([])
