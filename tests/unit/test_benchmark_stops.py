"""Stop sequences: MBPP's and HumanEval's are those of the standard harness, so pass@1 compares with published
numbers; a raw completion is cut where the harness cuts it; chat replies are not cut by them."""

from __future__ import annotations

import pytest

from wmtp.execution.problems import STOP, completion_from_reply, truncate_at_stop

# bigcode-project/bigcode-evaluation-harness at 8fc5bae6: bigcode_eval/tasks/mbpp.py and humaneval.py
# (`stop_words`; the harness also stops at the tokenizer's eos, as `generate` does here).
HARNESS_STOPS = {
    "mbpp": ["\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n<|/", "\n```"],
    "humaneval": ["\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```", "<file_sep>"],
}


def harness_cut(generation: str, stop_tokens: list[str]) -> str:
    """The harness's `Task._stop_at_stop_token` (bigcode_eval/base.py), as written there."""
    min_stop_index = len(generation)
    for stop_token in stop_tokens:
        stop_index = generation.find(stop_token)
        if stop_index != -1 and stop_index < min_stop_index:
            min_stop_index = stop_index
    return generation[:min_stop_index]


@pytest.mark.parametrize("benchmark", ["mbpp", "humaneval"])
def test_stop_sequences_are_the_harness_ones(benchmark):
    assert STOP[benchmark] == HARNESS_STOPS[benchmark]


# Continuations the earlier stops ("\nassert ", "\nprint(", "\nif __name__", "\nclass ", "\ndef ") cut later
# than the harness does, or not at all.
@pytest.mark.parametrize(("benchmark", "text", "cut"), [
    ("mbpp", "def f(x):\n    return x\nassert(f(1) == 1)\n", "def f(x):\n    return x"),
    ("mbpp", "def f(x):\n    return x\nprint f(1)\n", "def f(x):\n    return x"),
    ("mbpp", "def f(x):\n    return x\nif f(1):\n    pass\n", "def f(x):\n    return x"),
    ("mbpp", "def f(x):\n    return x\n<|/ file |>", "def f(x):\n    return x"),
    ("mbpp", "def f(x):\n    return x\nclass\tA: pass\n", "def f(x):\n    return x"),
    ("humaneval", "    return x\n@functools.cache\ndef g(): pass\n", "    return x"),
    ("humaneval", "    return x\nif x:\n    pass\n", "    return x"),
    ("humaneval", "    return x\ndef\tg(): pass\n", "    return x"),
    ("humaneval", "    return x<file_sep>other.py", "    return x"),
])
def test_a_completion_is_cut_where_the_harness_cuts_it(benchmark, text, cut):
    assert truncate_at_stop(text, STOP[benchmark]) == harness_cut(text, HARNESS_STOPS[benchmark]) == cut


def test_a_chat_reply_is_not_cut_by_the_stop_sequences():
    """Chat replies stop at their first closed code block (generation.StopAfterCodeBlock), never at a benchmark
    stop: a reply's code with a top-level `if` and `print` is kept whole."""
    reply = "```python\ndef f(x):\n    return x\n\nif __name__ == '__main__':\n    print(f(1))\n```\nDone."
    assert completion_from_reply(reply) == "\ndef f(x):\n    return x\n\nif __name__ == '__main__':\n    print(f(1))\n"
