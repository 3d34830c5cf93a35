"""pass@k: the unbiased estimator against the closed form, and the bootstrap interval."""

from __future__ import annotations

import random
from math import comb

import pytest

from wmtp.evaluate import bootstrap_ci, pass_at_k


@pytest.mark.parametrize(("n", "c", "k", "expected"), [
    (1, 0, 1, 0.0), (1, 1, 1, 1.0), (10, 0, 1, 0.0), (10, 10, 10, 1.0),
    (10, 3, 1, 0.3),                      # pass@1 is the fraction correct
    (5, 2, 2, 1 - comb(3, 2) / comb(5, 2)),  # 1 - 3/10 = 0.7
    (4, 1, 2, 0.5), (10, 9, 2, 1.0),      # fewer than k failures: certain
])
def test_hand_cases(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_matches_the_binomial_closed_form_on_random_cases():
    rng = random.Random(0)
    for _ in range(500):
        n = rng.randint(1, 200)
        c, k = rng.randint(0, n), rng.randint(1, n)
        closed = 1.0 - comb(n - c, k) / comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(closed, rel=1e-9, abs=1e-12)


def test_is_the_probability_that_some_of_k_draws_is_correct():
    """Monte-Carlo: draw k of n without replacement; the estimator is that event's probability."""
    rng = random.Random(1)
    n, c, k = 12, 3, 4
    pool = [True] * c + [False] * (n - c)
    hits = sum(any(rng.sample(pool, k)) for _ in range(40000)) / 40000
    assert pass_at_k(n, c, k) == pytest.approx(hits, abs=0.01)


@pytest.mark.parametrize(("n", "c", "k"), [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)])
def test_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="pass_at_k"):
        pass_at_k(n, c, k)


def test_bootstrap_interval_contains_the_mean_and_shrinks_with_more_problems():
    rng = random.Random(2)
    small = [float(rng.random() < 0.4) for _ in range(40)]
    large = [float(rng.random() < 0.4) for _ in range(1000)]
    for scores in (small, large):
        low, high = bootstrap_ci(scores)
        assert low <= sum(scores) / len(scores) <= high
    assert (bootstrap_ci(large)[1] - bootstrap_ci(large)[0]) < (bootstrap_ci(small)[1] - bootstrap_ci(small)[0])
    assert bootstrap_ci(small, seed=3) == bootstrap_ci(small, seed=3)
    assert bootstrap_ci([1.0] * 10) == (1.0, 1.0)
    # 95% of a binomial mean: about ± 1.96·sqrt(p(1-p)/n)
    low, high = bootstrap_ci(large)
    half = 1.96 * (0.4 * 0.6 / 1000) ** 0.5
    assert high - low == pytest.approx(2 * half, rel=0.2)
