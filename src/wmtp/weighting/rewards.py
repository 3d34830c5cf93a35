"""Rewards of Critic-WMTP (docs/method.md §5.3): one number per training document, from one source.

`make_reward(settings)` returns a function from a list of `wmtp.data.sources.Example` to one float per example, in
order; the critic places each document's reward at its last token (`critic.returns.token_rewards`). Kinds (recipe
`critic.reward.kind`):

- verifiable, check `tests`: the example's own tests run in the evaluation sandbox (MBPP asserts, HumanEval
  `check`, CodeContests stdin/stdout cases), exactly as evaluation judges a sample -> 1.0 if all pass else 0.0.
  Only mbpp, humaneval and codecontests sources carry tests.
- verifiable, check `parses`: 1.0 if prompt + completion compiles as Python (never run) else 0.0.
- labels: the example's meta["label"] (CodeContests: solutions 1, incorrect_solutions 0; a jsonl/hf `label`).
- reward_model: a Hugging Face sequence-classification model's score of the text prompt + completion, tokenized
  by the reward model's own tokenizer: its logit (one label) or the probability of `positive_label`.
- function: a user's `module:function`, called with the list of examples.
"""

from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field, model_validator

from ..config import ConfigError, Strict
from ..data.sources import Example
from ..execution.problems import BENCHMARKS, problem_from_example
from ..execution.samples import execute
from ..execution.sandbox import Limits, Sandbox

RewardFn = Callable[[list[Example]], list[float]]


class RewardSettings(Strict):
    """Where a document's reward comes from (one number per training document, placed at its last token)."""

    kind: Literal["verifiable", "labels", "reward_model", "function"] = Field(
        description="verifiable: run the example's own tests or check it parses (`check`); labels: the dataset's "
        "label; reward_model: a sequence-classification model's score; function: your `module:function`")
    check: Literal["tests", "parses"] = Field(
        "tests", description="verifiable: `tests` runs the example's own tests in the evaluation sandbox (MBPP "
        "test_list, HumanEval check, CodeContests tests) -> 1 if all pass else 0; `parses`: 1 if the document is "
        "valid Python (compiled, never run)")
    timeout_s: float = Field(10.0, gt=0, description="verifiable tests: wall-clock seconds per program")
    model: str | None = Field(None, description="reward_model: a Hugging Face sequence-classification model "
                              "(hub id or directory) scoring the decoded text with its own tokenizer")
    positive_label: int = Field(
        -1, description="reward_model with several labels: the reward is the probability of this label "
        "(default the last); a one-logit model's reward is its logit")
    batch_size: int = Field(8, ge=1, description="reward_model: texts per forward")
    function: str | None = Field(
        None, description="function: `module:function` called with the list of examples (wmtp.data.sources.Example) "
        "and returning one float per example")

    @model_validator(mode="after")
    def _keys_of_kind(self) -> RewardSettings:
        owners = {"check": ("verifiable",), "timeout_s": ("verifiable",), "model": ("reward_model",),
                  "positive_label": ("reward_model",), "batch_size": ("reward_model",), "function": ("function",)}
        for key in self.model_fields_set:
            if key in owners and self.kind not in owners[key]:
                raise ValueError(f"`{key}` does not apply to reward kind {self.kind} (only {', '.join(owners[key])})")
        if self.kind == "reward_model" and not self.model:
            raise ValueError("reward kind reward_model needs `model` (a sequence-classification model)")
        if self.kind == "function" and (not self.function or ":" not in self.function):
            raise ValueError("reward kind function needs `function: module:function`")
        return self


# Programs judged at once: the evaluation's default (`execute`); each is single-threaded and short.
TEST_WORKERS = 2


def make_reward(settings: RewardSettings, device: torch.device | str | None = None) -> RewardFn:
    """The reward of `settings` (recipe `critic.reward`) as `rewards = fn(examples)`: examples [N] -> floats [N].

    `device` is where a reward model runs (default CPU); the other kinds do not use it. Everything that can be
    checked before scoring (the sandbox's isolation, the model, the function) is checked here.
    """
    if settings.kind == "verifiable":
        return parses_reward if settings.check == "parses" else TestsReward(settings.timeout_s)
    if settings.kind == "labels":
        return label_reward
    if settings.kind == "reward_model":
        return RewardModel(settings.model, settings.positive_label, settings.batch_size, device or "cpu")
    return user_function(settings.function)


# ------------------------------------------------------------------------------------------------ verifiable
class TestsReward:
    """verifiable/tests: 1.0 when the example (prompt + completion) passes all its benchmark's tests, else 0.0.

    Runs in a `Sandbox` with automatic isolation: it raises `SandboxError` when this machine offers none, because
    training data is run as code. A CodeContests example runs once per test case, stopping at the first failure.
    """

    def __init__(self, timeout_s: float) -> None:
        # A single-threaded program's CPU time cannot exceed its wall time, so the wall-clock timeout governs; the
        # CPU rlimit (whole seconds) only stops a program that spreads its work over several cores.
        self.sandbox = Sandbox(Limits(timeout_s=timeout_s, cpu_s=math.ceil(timeout_s)))

    def __call__(self, examples: list[Example]) -> list[float]:
        records = [_test_record(ex) for ex in examples]  # every example checked before any program runs
        return [1.0 if result["passed"] else 0.0 for result in execute(records, self.sandbox, workers=TEST_WORKERS)]


def _test_record(example: Example) -> dict:
    """The example as a generations record (benchmark, task_id, prompt, completion, tests) for `execute`."""
    benchmark = example.source.split(":", 1)[0]  # mbpp sources are named mbpp:<split file stem>
    if benchmark not in BENCHMARKS:
        raise ConfigError(f"reward verifiable (check: tests): example `{example.key}` from source `{example.source}` "
                          f"has no tests; only {', '.join(BENCHMARKS)} sources carry tests (for other data use "
                          "check: parses, labels, reward_model or function)")
    problem = problem_from_example(benchmark, example)
    return {"benchmark": benchmark, "task_id": problem.task_id, "prompt": example.prompt,
            "completion": example.completion, "tests": problem.tests}


def parses_reward(examples: list[Example]) -> list[float]:
    """verifiable/parses: 1.0 per example whose prompt + completion compiles as Python (it is never run), else 0.0."""
    return [1.0 if parses_as_python(ex.prompt + ex.completion, ex.key) else 0.0 for ex in examples]


def parses_as_python(source: str, name: str = "<document>") -> bool:
    """Whether `source` compiles as a Python module (it is never run)."""
    try:
        compile(source, name, "exec", dont_inherit=True)  # dont_inherit: this module's __future__ flags stay out
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        # ValueError: NUL bytes before Python 3.12; MemoryError, RecursionError: absurdly deep nesting
        return False
    return True


# ------------------------------------------------------------------------------------------------ labels
def label_reward(examples: list[Example]) -> list[float]:
    """labels: each example's meta["label"] (bool, int or float) as a float."""
    rewards = []
    for ex in examples:
        label = ex.meta.get("label")
        if not isinstance(label, (int, float)):  # bool is an int
            raise ConfigError(f"reward labels: example `{ex.key}` (source `{ex.source}`) has no numeric label; labels "
                              "come from codecontests sources (solutions 1; incorrect_solutions 0 with "
                              "`incorrect_solutions: true`) or a `label` field of jsonl/hf records")
        rewards.append(float(label))
    return rewards


# ------------------------------------------------------------------------------------------------ reward model
class RewardModel:
    """reward_model: a sequence-classification model scoring prompt + completion as plain text.

    The text is tokenized by the reward model's own tokenizer (it need not share the trained model's vocabulary),
    truncated to the smaller of the tokenizer's and the model's maximum length, right-padded in batches of
    `batch_size`. Score per text: the logit of a one-label model, else softmax(logits)[positive_label] (negative
    indices count from the end, as in Python).
    """

    def __init__(self, name: str, positive_label: int, batch_size: int, device: torch.device | str) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name)
            self.model = AutoModelForSequenceClassification.from_pretrained(name)
        except (OSError, ValueError) as exc:  # not found / not cached offline / not a sequence classifier
            raise ConfigError(f"critic.reward.model: cannot load `{name}` as a sequence-classification model with "
                              f"its tokenizer: {exc}") from exc
        labels = self.model.config.num_labels
        if labels > 1 and not -labels <= positive_label < labels:
            raise ConfigError(f"critic.reward.positive_label: {positive_label} is not a label of `{name}` "
                              f"({labels} labels)")
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ConfigError(f"critic.reward.model: the tokenizer of `{name}` has neither a pad nor an eos token "
                                  "to pad batches with")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # Causal classifiers pool the last token that is not padding; they need to know the pad id. Right padding
        # keeps each text's positions those of the text alone, so a score does not depend on its batch.
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"
        limits = [self.tokenizer.model_max_length, getattr(self.model.config, "max_position_embeddings", None)]
        self.max_length = min(n for n in limits if n is not None)
        self.positive_label, self.batch_size = positive_label, batch_size
        self.device = torch.device(device)
        self.model.to(self.device).eval()

    @torch.inference_mode()
    def __call__(self, examples: list[Example]) -> list[float]:
        texts = [ex.prompt + ex.completion for ex in examples]
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start:start + self.batch_size], truncation=True, max_length=self.max_length,
                                   padding=True, return_tensors="pt")
            # Only ids and mask: single-segment token type ids are all zero, which models that use them assume when
            # absent (GPT-2 would add the embedding of token 0 instead).
            logits = self.model(input_ids=batch["input_ids"].to(self.device),
                                attention_mask=batch["attention_mask"].to(self.device)).logits.float()  # [b, labels]
            score = logits[:, 0] if logits.shape[-1] == 1 else logits.softmax(-1)[:, self.positive_label]
            scores += score.tolist()
        return scores


# ------------------------------------------------------------------------------------------------ function
def user_function(spec: str) -> RewardFn:
    """function: `module:function` imported from the Python path, checked on every call to return one finite number
    per example."""
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"critic.reward.function `{spec}`: cannot import `{module_name}` ({exc})") from exc
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ConfigError(f"critic.reward.function `{spec}`: module `{module_name}` has no function `{attribute}`")

    def reward(examples: list[Example]) -> list[float]:
        result = function(examples)
        if isinstance(result, (str, bytes)) or not hasattr(result, "__len__") or len(result) != len(examples):
            raise ConfigError(f"critic.reward.function `{spec}` must return a sequence of one number per example "
                              f"({len(examples)}), got {_describe(result)}")
        # A NaN or infinite reward would silently poison every value target of its document.
        bad = [v for v in result if not (isinstance(v, numbers.Real) and math.isfinite(v))]
        if bad:
            raise ConfigError(f"critic.reward.function `{spec}` returned {bad[0]!r}; rewards must be finite numbers")
        return [float(v) for v in result]

    return reward


def _describe(value: object) -> str:
    return f"{type(value).__name__} of length {len(value)}" if hasattr(value, "__len__") else type(value).__name__
