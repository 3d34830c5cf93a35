"""pass@k: the unbiased estimator (Chen et al., 2021) and a bootstrap confidence interval over problems."""

from __future__ import annotations

import random
from collections import defaultdict


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


def summarize(results: list[dict], ks: list[int], *, generation: dict | None = None, seed: int = 0) -> dict:
    """Per benchmark: n per problem, pass@k (mean over problems) with a 95% bootstrap CI for each k ≤ n, and the
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
            low, high = bootstrap_ci(scores, seed=seed)
            entry["pass@k"][f"pass@{k}"] = {"mean": sum(scores) / len(scores), "ci95": [low, high]}
        summary[benchmark] = entry
    return {"generation": generation or {}, "ks": ks, "benchmarks": summary}
