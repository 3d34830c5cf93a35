"""pass@k: the unbiased estimator against the closed form, and the bootstrap interval."""

from __future__ import annotations

import random
from math import comb

import pytest

from wmtp.evaluate import bootstrap_ci, pass_at_k
from wmtp.evaluate.passk import mcnemar_p, paired_difference, summarize


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


def test_mcnemar_p_is_the_exact_binomial_test():
    from scipy.stats import binomtest

    assert mcnemar_p(0, 0) == 1.0
    for a, b in [(0, 5), (5, 0), (3, 9), (10, 10), (1, 20), (17, 4), (0, 1)]:
        assert mcnemar_p(a, b) == pytest.approx(binomtest(min(a, b), a + b, 0.5).pvalue, rel=1e-12)
        assert mcnemar_p(a, b) == mcnemar_p(b, a)


def test_paired_difference_on_the_common_problems():
    rng = random.Random(0)
    tasks = [f"t{i}" for i in range(200)]
    base = {t: float(rng.random() < 0.4) for t in tasks}
    other = {t: v if rng.random() < 0.8 else 1.0 - v for t, v in base.items()}  # strongly paired outcomes
    other["extra"] = 1.0  # only one side scored it: left out
    d = paired_difference(base, other)
    deltas = [other[t] - base[t] for t in tasks]
    assert d["problems"] == 200 and d["delta"] == pytest.approx(sum(deltas) / 200)
    assert d["better"] == sum(x > 0 for x in deltas) and d["worse"] == sum(x < 0 for x in deltas)
    low, high = d["ci95"]
    assert low <= d["delta"] <= high
    assert (low, high) == bootstrap_ci(deltas, seed=0)  # the interval of the per-problem differences
    # pairing matters: the paired interval is narrower than the difference of two independent intervals
    b_low, b_high = bootstrap_ci([base[t] for t in tasks], seed=1)
    o_low, o_high = bootstrap_ci([other[t] for t in tasks], seed=2)
    assert high - low < (b_high - b_low + o_high - o_low) / 1.5
    assert d["mcnemar_p"] == mcnemar_p(d["worse"], d["better"])
    shifted = paired_difference({t: 0.2 for t in tasks}, {t: 0.5 for t in tasks})
    assert shifted["ci95"] == [pytest.approx(0.3), pytest.approx(0.3)] and shifted["mcnemar_p"] is None
    with pytest.raises(ValueError, match="no problem in common"):
        paired_difference({"a": 1.0}, {"b": 1.0})


@pytest.mark.parametrize(("solved", "problems"), [(0, 164), (164, 164), (17, 500), (0, 1), (1, 1), (3, 20)])
def test_greedy_pass_at_1_has_a_wilson_interval_that_does_not_collapse(solved, problems):
    """With one sample per problem, pass@1's Wilson interval is scipy's for `solved` of `problems`; at 0/n and n/n
    it is not a point, where the bootstrap's is."""
    from scipy.stats import binomtest

    results = [{"benchmark": "humaneval", "task_id": f"t{i}", "sample": 0, "passed": i < solved}
               for i in range(problems)]
    entry = summarize(results, [1])["benchmarks"]["humaneval"]["pass@k"]["pass@1"]
    expected = binomtest(solved, problems).proportion_ci(confidence_level=0.95, method="wilson")
    assert entry["wilson95"] == [pytest.approx(expected.low, abs=1e-12), pytest.approx(expected.high, abs=1e-12)]
    low, high = entry["wilson95"]
    assert low < high and low <= entry["mean"] <= high
    assert set(entry) >= {"mean", "ci95"}  # the bootstrap interval stays


def test_wilson_interval_of_sampled_pass_at_k_is_wider_than_the_bootstrap():
    """Per-problem scores in [0, 1] (n > 1 samples) have variance at most mean·(1 − mean), the 0/1 case: the
    Wilson interval over problems treats them as that worst case, so it holds the bootstrap's."""
    rng = random.Random(4)
    results = [{"benchmark": "mbpp", "task_id": f"t{t}", "sample": i, "passed": rng.random() < 0.3 + 0.004 * t}
               for t in range(100) for i in range(10)]
    for name, entry in summarize(results, [1, 5])["benchmarks"]["mbpp"]["pass@k"].items():
        (low, high), (b_low, b_high) = entry["wilson95"], entry["ci95"]
        assert low <= b_low and b_high <= high, name
    none_solved = [{**r, "passed": False} for r in results]
    low, high = summarize(none_solved, [1])["benchmarks"]["mbpp"]["pass@k"]["pass@1"]["wilson95"]
    assert low == 0.0 < high
