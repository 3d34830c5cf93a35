"""The evaluation harness on known answers: every HumanEval canonical solution and every MBPP test-split reference
solution, written as a generations file and judged by `wmtp execute` in the sandbox, must pass.

    .venv/bin/python experiments/harness-check/harness_check.py --out runs/harness

Writes `<out>/generations.jsonl`, `wmtp execute`'s files beside it, and `<out>/summary.json` with the pass rate per
benchmark and every failure with its reason (an empty list is the expected result). Exit code 1 on a failure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mbpp", default=str(ROOT / "data" / "mbpp"), help="MBPP data (default: the bundled copy)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--isolation", default="auto")
    args = parser.parse_args()

    from wmtp.cli import main as wmtp
    from wmtp.execution.problems import load_problems

    problems = load_problems("humaneval", None) + load_problems("mbpp", args.mbpp, split="test")
    args.out.mkdir(parents=True, exist_ok=True)
    generations = args.out / "generations.jsonl"
    with generations.open("w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps({"benchmark": p.benchmark, "task_id": p.task_id, "sample": 0, "prompt": p.prompt,
                                "completion": p.reference, "tests": p.tests,
                                "generation": {"model": "the dataset's own solutions"}}) + "\n")
    started = time.monotonic()
    code = wmtp(["execute", str(generations), "--allow-code-execution", "--k", "1", "--workers", str(args.workers),
                 "--isolation", args.isolation])
    seconds = round(time.monotonic() - started, 1)
    if code != 0:
        return code
    results = [json.loads(line) for line in (args.out / "executions.jsonl").read_text().splitlines()]
    totals, passed = Counter(r["benchmark"] for r in results), Counter(r["benchmark"] for r in results if r["passed"])
    failures = [{"benchmark": r["benchmark"], "task_id": r["task_id"], "reason": r["reason"]}
                for r in results if not r["passed"]]
    summary = {"command": " ".join(["experiments/harness-check/harness_check.py", *sys.argv[1:]]),
               "date": time.strftime("%Y-%m-%d"),
               "seconds": seconds, "problems": dict(totals), "passed": dict(passed), "failures": failures}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    for benchmark in totals:
        print(f"{benchmark}: {passed[benchmark]}/{totals[benchmark]} reference solutions pass")
    for failure in failures:
        print(f"FAILED {failure['benchmark']} {failure['task_id']}: {failure['reason']}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
