"""Re-score the stored SmolLM2 evaluations with the standard harness's stop sequences, and re-count the README's
failure categories, from the raw files in experiments/smollm2/results (no model is run).

Re-cutting a stored completion is exact: each earlier stop sequence begins with one of today's (`EARLIER_STOP`
below; checked at start), and today's contain no newline after their first character, so a completion cut at an
earlier stop holds every text that today's stops would cut at, and `truncate_at_stop(stored, STOP)` equals what a
new generation would give (greedy decoding: the tokens up to the cut are the same). Chat replies are not cut by
stop sequences (their completion is the reply's first code block) and are only re-judged, to count why they fail.

    .venv/bin/python experiments/smollm2/smollm2_rescore.py --out experiments/smollm2/results/rescore_harness_stops.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from collections import Counter
from pathlib import Path

from wmtp.evaluate.passk import paired_difference, summarize
from wmtp.execution.problems import STOP, truncate_at_stop
from wmtp.execution.samples import execute
from wmtp.execution.sandbox import Limits, Sandbox

RESULTS = Path(__file__).resolve().parent / "results"
RAW = {"unmodified": "base_eval", "baseline-mtp": "full_mtp_eval", "rho1": "full_rho1_eval"}
CHAT = "base_humaneval_chat"
# The stop sequences these evaluations were generated with (wmtp before commit bf6eae7).
EARLIER_STOP = {
    "mbpp": ["\nclass ", "\nassert ", '\n"""', "\nprint(", "\nif __name__", "\n```"],
    "humaneval": ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n```"],
}
_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt))\b")


def check_recut_is_exact() -> None:
    for benchmark, earlier in EARLIER_STOP.items():
        for stop in earlier:
            assert any(stop.startswith(new) for new in STOP[benchmark]), (benchmark, stop)
        assert all("\n" not in new[1:] for new in STOP[benchmark]), benchmark


def read(name: str) -> list[dict]:
    with gzip.open(RESULTS / f"{name}_generations.jsonl.gz", "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def failure_kind(verdict: dict) -> str:
    """The exception a failed program ended with (its stderr's last `...Error` line), else the sandbox's reason."""
    for line in reversed(verdict.get("stderr", "").splitlines()):
        match = _EXCEPTION.match(line.strip())
        if match:
            return match.group(1)
    return verdict["reason"]


def per_problem(verdicts: list[dict], benchmark: str) -> dict[str, float]:
    return {v["task_id"]: float(v["passed"]) for v in verdicts if v["benchmark"] == benchmark}


def rescore(sandbox: Sandbox, name: str) -> tuple[dict, list[dict]]:
    records = read(name)
    stored = json.loads((RESULTS / f"{name}_results.json").read_text())["passk"]["benchmarks"]
    recut = [{**r, "completion": truncate_at_stop(r["completion"], STOP[r["benchmark"]])} for r in records]
    verdicts = execute(recut, sandbox, workers=1)
    summary = summarize(verdicts, [1])["benchmarks"]
    out = {}
    for benchmark, entry in summary.items():
        before = {task: float(p["c"] > 0) for task, p in stored[benchmark]["per_problem"].items()}
        after = per_problem(verdicts, benchmark)
        changed = [r["task_id"] for r, c in zip(records, recut, strict=True)
                   if r["benchmark"] == benchmark and r["completion"] != c["completion"]]
        out[benchmark] = {"problems": entry["problems"], "pass@1": entry["pass@k"]["pass@1"],
                          "earlier_pass@1": stored[benchmark]["pass@k"]["pass@1"]["mean"],
                          "completions_cut_differently": len(changed),
                          "verdicts_changed": sorted(t for t in after if after[t] != before[t])}
    return out, verdicts


def raw_humaneval_starts(records: list[dict]) -> dict[str, int]:
    """How the unmodified model's raw HumanEval completions (as stored, earlier stops) begin."""
    counts = Counter()
    for r in records:
        if r["benchmark"] != "humaneval":
            continue
        text = r["completion"]
        counts["empty" if not text.strip() else "fence" if text.lstrip().startswith("```") else "other"] += 1
    return dict(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    check_recut_is_exact()
    sandbox = Sandbox(Limits(timeout_s=10))
    report: dict = {"stops": {b: STOP[b] for b in EARLIER_STOP}, "earlier_stops": EARLIER_STOP, "runs": {}}
    verdicts = {}
    for label, name in RAW.items():
        report["runs"][label], verdicts[label] = rescore(sandbox, name)
    base = per_problem(verdicts["unmodified"], "mbpp")
    report["mbpp_paired_vs_unmodified"] = {label: paired_difference(base, per_problem(verdicts[label], "mbpp"))
                                           for label in ("baseline-mtp", "rho1")}
    report["mbpp_rho1_vs_baseline_mtp"] = paired_difference(per_problem(verdicts["baseline-mtp"], "mbpp"),
                                                            per_problem(verdicts["rho1"], "mbpp"))
    report["raw_humaneval_unmodified_starts"] = raw_humaneval_starts(read(RAW["unmodified"]))
    chat = execute(read(CHAT), sandbox, workers=1)
    failed = [v for v in chat if not v["passed"]]
    report["chat_humaneval"] = {"solved": len(chat) - len(failed), "failed": len(failed),
                                "failures_by_kind": dict(Counter(map(failure_kind, failed)).most_common())}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k not in ("stops", "earlier_stops")}, indent=2))


if __name__ == "__main__":
    main()
