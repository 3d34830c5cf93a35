"""pass@k: the unbiased estimator (Chen et al., 2021), a bootstrap confidence interval over problems, and a Wilson
score interval that does not collapse to a point when no problem (or every problem) is solved."""

from __future__ import annotations

import math
import random
from collections import defaultdict
from statistics import NormalDist


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 − C(n−c, k)/C(n, k),
    computed as 1 − Π_{i=n−c+1}^{n} (1 − k/i) (no huge binomials)."""
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def bootstrap_ci(per_problem: list[float], *, resamples: int = 2000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `per_problem` scores, resampling problems with replacement.
    Deterministic given `seed`."""
    if not per_problem:
        raise ValueError("bootstrap_ci: no problems")
    rng = random.Random(seed)
    n = len(per_problem)
    means = sorted(sum(rng.choices(per_problem, k=n)) / n for _ in range(resamples))
    tail = (1.0 - confidence) / 2
    low = means[int(tail * (resamples - 1))]
    high = means[int(round((1.0 - tail) * (resamples - 1)))]
    return low, high


def wilson_ci(mean: float, n: int, *, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion `mean` observed over `n` trials (Wilson, 1927): for 0/1 outcomes the
    standard binomial interval, which stays a real interval at 0/n and n/n where a bootstrap's collapses to a point.

    Used for the mean of per-problem scores in [0, 1] (n = problems): such a score's variance is at most
    mean·(1 − mean), the 0/1 case, so for fractional scores (several samples per problem) the interval is
    conservative (at least as wide as the 0/1 one)."""
    if n < 1 or not 0.0 <= mean <= 1.0:
        raise ValueError(f"wilson_ci: need n >= 1 and 0 <= mean <= 1, got n={n}, mean={mean}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    centre = (mean + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n))
    # At 0/n (n/n) the lower (upper) end is exactly 0 (1); floating point would land a hair inside.
    return (0.0 if mean == 0 else centre - half), (1.0 if mean == 1 else centre + half)


def summarize(results: list[dict], ks: list[int], *, generation: dict | None = None, seed: int = 0) -> dict:
    """Per benchmark: n per problem, pass@k (mean over problems) for each k ≤ n with its 95% bootstrap CI over
    problems (`ci95`) and 95% Wilson score interval over problems (`wilson95`, see `wilson_ci`), and the
    per-problem (n, c, pass@k). A k larger than a problem's n is reported as missing, never estimated."""
    by_problem: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        by_problem[r["benchmark"]][r["task_id"]].append(bool(r["passed"]))
    summary = {}
    for benchmark, problems in by_problem.items():
        ns = {len(v) for v in problems.values()}
        per_problem = {task: {"n": len(v), "c": sum(v)} for task, v in problems.items()}
        entry = {"problems": len(problems), "n": min(ns) if len(ns) == 1 else sorted(ns), "pass@k": {},
                 "per_problem": per_problem}
        for k in ks:
            if k > min(ns):
                entry["pass@k"][f"pass@{k}"] = None
                continue
            scores = [pass_at_k(p["n"], p["c"], k) for p in per_problem.values()]
            for task, score in zip(per_problem, scores, strict=True):
                per_problem[task][f"pass@{k}"] = score
            mean = min(1.0, sum(scores) / len(scores))  # a float sum of scores near 1 may round above 1
            low, high = bootstrap_ci(scores, seed=seed)
            entry["pass@k"][f"pass@{k}"] = {"mean": mean, "ci95": [low, high],
                                            "wilson95": list(wilson_ci(mean, len(scores)))}
        summary[benchmark] = entry
    return {"generation": generation or {}, "ks": ks, "benchmarks": summary}


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar test of paired binary outcomes: under "no difference" each of the discordant
    problems (solved by one side only) goes either way with probability 1/2, so p = P(Binomial(b, 1/2) as far
    from b/2 as observed), b = only_a + only_b; 1 when there is no discordant problem."""
    total, low = only_a + only_b, min(only_a, only_b)
    if total == 0:
        return 1.0
    tail = sum(math.comb(total, i) for i in range(low + 1)) / 2**total
    return min(1.0, 2 * tail)


def paired_difference(base: dict[str, float], other: dict[str, float], *, resamples: int = 2000,
                      seed: int = 0) -> dict:
    """`other` − `base` on the problems both scored (per-problem pass@k by task id): the mean difference with a
    paired percentile bootstrap interval (problems resampled together), the problems each side does better on,
    and for 0/1 scores (greedy pass@1) the exact McNemar p-value."""
    common = sorted(set(base) & set(other))
    if not common:
        raise ValueError("paired_difference: no problem in common")
    deltas = [other[t] - base[t] for t in common]
    low, high = bootstrap_ci(deltas, resamples=resamples, seed=seed)
    better, worse = sum(d > 0 for d in deltas), sum(d < 0 for d in deltas)
    binary = all(base[t] in (0.0, 1.0) and other[t] in (0.0, 1.0) for t in common)
    return {"problems": len(common), "base": sum(base[t] for t in common) / len(common),
            "other": sum(other[t] for t in common) / len(common), "delta": sum(deltas) / len(deltas),
            "ci95": [low, high], "better": better, "worse": worse,
            "mcnemar_p": mcnemar_p(worse, better) if binary else None}
