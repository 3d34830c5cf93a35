"""Critic rewards: each kind on real inputs, and the data they read (CodeContests incorrect solutions, jsonl labels)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

from wmtp.config import ConfigError, DataSource
from wmtp.data.sequences import train_bpe_tokenizer
from wmtp.data.sources import Example, read_source
from wmtp.weighting.rewards import RewardSettings, make_reward

MBPP = str(Path(__file__).resolve().parents[2] / "data" / "mbpp")
CORRECT = "a, b = map(int, input().split())\nprint(a + b)\n"


def codecontests_file(tmp_path: Path) -> Path:
    """Two problems in the Hugging Face schema: `sum-two` (a correct and an incorrect Python solution, three tests)
    and `no-python` (a C++ solution only, and one incorrect Python solution)."""
    tests = {"public_tests": {"input": ["1 2\n"], "output": ["3\n"]},
             "private_tests": {"input": ["10 -4\n", "0 0\n"], "output": ["6\n", "0\n"]},
             "generated_tests": {"input": [], "output": []}}
    records = [
        {"name": "sum-two", "description": "Print the sum of two integers.", **tests,
         "solutions": {"language": [2, 3], "solution": ["int main(){}", CORRECT]},
         "incorrect_solutions": {"language": [2, 3], "solution": ["int main(){return 1;}", "print(3)\n"]}},
        {"name": "no-python", "description": "Print the sum of two integers.", **tests,
         "solutions": {"language": [2], "solution": ["int main(){}"]},
         "incorrect_solutions": {"language": [3], "solution": ["print(a + b)\n"]}},
    ]
    path = tmp_path / "cc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def codecontests(tmp_path: Path, **spec) -> list[Example]:
    return read_source(DataSource(kind="codecontests", dataset="cc", **spec), {"cc": str(codecontests_file(tmp_path))})


def jsonl(tmp_path: Path, lines: list[str]) -> list[Example]:
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return read_source(DataSource(kind="jsonl", dataset="d"), {"d": str(path)})


# ------------------------------------------------------------------------------------------------ data
def test_codecontests_incorrect_solutions_are_examples_labelled_zero(tmp_path):
    default = codecontests(tmp_path)
    assert [(e.key, e.meta["label"]) for e in default] == [("codecontests/sum-two", 1)]
    both = codecontests(tmp_path, incorrect_solutions=True)
    assert [(e.key, e.completion, e.meta["label"]) for e in both] == [
        ("codecontests/sum-two", CORRECT, 1), ("codecontests/sum-two/incorrect0", "print(3)\n", 0),
        ("codecontests/no-python/incorrect0", "print(a + b)\n", 0)]  # only Python, even without a correct one
    assert both[0].prompt == both[1].prompt and both[1].meta["private_tests"] == both[0].meta["private_tests"]
    with pytest.raises(ValueError, match="`incorrect_solutions` does not apply to kind jsonl"):
        DataSource(kind="jsonl", dataset="d", incorrect_solutions=True)


def test_jsonl_label_is_a_number_named_by_file_and_line(tmp_path):
    examples = jsonl(tmp_path, ['{"text": "a", "label": 1}', '{"prompt": "Q", "completion": "A", "label": 0.5}',
                                '{"text": "b", "label": true}', '{"text": "c"}'])
    assert [e.meta.get("label") for e in examples] == [1, 0.5, True, None]
    with pytest.raises(ConfigError, match=r"d\.jsonl:2: key `label` must be int or float, got str"):
        jsonl(tmp_path, ['{"text": "a", "label": 1}', '{"text": "b", "label": "good"}'])


# ------------------------------------------------------------------------------------------------ verifiable
@pytest.fixture(scope="module")
def tests_reward():
    return make_reward(RewardSettings(kind="verifiable", check="tests", timeout_s=10))


def test_mbpp_and_humaneval_reference_code_scores_one_and_broken_code_zero(tests_reward):
    mbpp = read_source(DataSource(kind="mbpp", dataset="mbpp", split="test", limit=4), {"mbpp": MBPP})
    humaneval = read_source(DataSource(kind="humaneval", limit=2), {})
    assert mbpp[0].source == "mbpp:test"
    examples = mbpp + humaneval
    broken = [replace(ex, completion="def nothing():\n    pass\n") for ex in examples]
    assert tests_reward(examples + broken) == [1.0] * 6 + [0.0] * 6


def test_codecontests_correct_solution_scores_one_and_incorrect_zero(tests_reward, tmp_path):
    examples = codecontests(tmp_path, incorrect_solutions=True)
    assert tests_reward(examples) == [1.0, 0.0, 0.0]  # print(3) passes the public test only


def test_examples_without_tests_are_an_error_naming_the_example(tests_reward, tmp_path):
    (example,) = jsonl(tmp_path, ['{"text": "print(1)"}'])
    with pytest.raises(ConfigError, match=r"example `d/0` from source `jsonl:d` has no tests; only mbpp, humaneval, "
                                          r"codecontests sources carry tests"):
        tests_reward([example])


def test_parses_compiles_prompt_plus_completion_without_running_it():
    parses = make_reward(RewardSettings(kind="verifiable", check="parses"))
    docstring = '"""\nAdd one.\n"""\n'
    examples = [Example(docstring, "def f(x):\n    return x + 1\n", "jsonl:d", "valid"),
                Example(docstring, "raise SystemExit(1)\n", "jsonl:d", "exits-if-run"),
                Example("def f(x):\n", "return x +\n", "jsonl:d", "syntax"),
                Example("", "    x = 1\n", "jsonl:d", "indentation"),
                Example("", "x = 1\0\n", "jsonl:d", "nul-byte"),
                Example("", "x = " + "-" * 200_000 + "1\n", "jsonl:d", "too-deep")]
    assert parses(examples) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


# ------------------------------------------------------------------------------------------------ labels
def test_labels_come_from_codecontests_and_jsonl(tmp_path):
    labels = make_reward(RewardSettings(kind="labels"))
    assert labels(codecontests(tmp_path, incorrect_solutions=True)) == [1.0, 0.0, 0.0]
    examples = jsonl(tmp_path, ['{"text": "a", "label": 1}', '{"text": "b", "label": 0.25}',
                                '{"text": "c", "label": false}', '{"text": "d"}'])
    assert labels(examples[:3]) == [1.0, 0.25, 0.0]
    with pytest.raises(ConfigError, match=r"example `d/3` \(source `jsonl:d`\) has no numeric label; labels come "
                                          r"from codecontests sources"):
        labels(examples)


# ------------------------------------------------------------------------------------------------ reward model
TEXTS = ["def add(a, b):\n    return a + b\n", "print('hello world')\n", "x = 1\n", "for i in range(10):\n    pass\n",
         "import os\nprint(os.getcwd())\n" * 3]


@pytest.fixture
def tokenizer():
    return train_bpe_tokenizer(TEXTS * 4, vocab_size=300, min_frequency=1)


def save_classifier(path: Path, model, tokenizer) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def examples_of(texts: list[str]) -> list[Example]:
    # The scored text is prompt + completion: split each one to show it is joined back.
    return [Example(t[:5], t[5:], "jsonl:d", f"d/{i}") for i, t in enumerate(texts)]


def test_one_label_reward_model_scores_its_logit_batched_or_not(tmp_path, tokenizer):
    torch.manual_seed(0)
    tokenizer.pad_token = None  # the reward model pads with eos and tells the model which id is padding
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, num_labels=1,
                         pad_token_id=None)
    model = LlamaForSequenceClassification(config).eval()
    path = save_classifier(tmp_path / "rm", model, tokenizer)
    with torch.no_grad():
        direct = [model(input_ids=tokenizer(t, return_tensors="pt")["input_ids"]).logits[0, 0].item() for t in TEXTS]
    for batch_size in (1, 3):
        scores = make_reward(RewardSettings(kind="reward_model", model=path, batch_size=batch_size))(examples_of(TEXTS))
        assert scores == pytest.approx(direct, abs=1e-5)
    assert len(set(direct)) == len(TEXTS)


def test_two_label_reward_model_scores_the_positive_label_probability(tmp_path, tokenizer):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=24, num_labels=2)
    model = GPT2ForSequenceClassification(config).eval()
    path = save_classifier(tmp_path / "rm", model, tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    with torch.no_grad():  # the last text is longer than the model's 24 positions: truncated
        ids = [tokenizer(t, truncation=True, max_length=24, return_tensors="pt")["input_ids"] for t in TEXTS]
        assert ids[-1].shape[1] == 24
        direct = torch.cat([model(input_ids=i).logits.softmax(-1) for i in ids])  # [5, 2]
    last = make_reward(RewardSettings(kind="reward_model", model=path, batch_size=2))(examples_of(TEXTS))
    first = make_reward(RewardSettings(kind="reward_model", model=path, positive_label=0))(examples_of(TEXTS))
    assert last == pytest.approx(direct[:, 1].tolist(), abs=1e-5)
    assert first == pytest.approx(direct[:, 0].tolist(), abs=1e-5)
    assert last != pytest.approx(first, abs=1e-3)
    with pytest.raises(ConfigError, match=r"critic.reward.positive_label: 2 is not a label of .* \(2 labels\)"):
        make_reward(RewardSettings(kind="reward_model", model=path, positive_label=2))


def test_missing_reward_model_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="critic.reward.model: cannot load"):
        make_reward(RewardSettings(kind="reward_model", model=str(tmp_path / "missing")))


# ------------------------------------------------------------------------------------------------ function
def test_user_function_is_called_with_the_examples(tmp_path, monkeypatch):
    (tmp_path / "wmtp_test_reward_module.py").write_text(
        "SEEN = []\n"
        "def length(examples):\n"
        "    SEEN.extend(ex.key for ex in examples)\n"
        "    return [len(ex.completion) for ex in examples]\n"
        "def short(examples):\n"
        "    return [1.0]\n"
        "def nan(examples):\n"
        "    return [float('nan')] * len(examples)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    examples = [Example("", "abc", "jsonl:d", "d/0"), Example("q", "abcdef", "jsonl:d", "d/1")]

    length = make_reward(RewardSettings(kind="function", function="wmtp_test_reward_module:length"))
    assert length(examples) == [3.0, 6.0]
    import wmtp_test_reward_module

    assert wmtp_test_reward_module.SEEN == ["d/0", "d/1"]
    with pytest.raises(ConfigError, match=r"`wmtp_test_reward_module:short` must return a sequence of one number "
                                          r"per example \(2\), got list of length 1"):
        make_reward(RewardSettings(kind="function", function="wmtp_test_reward_module:short"))(examples)
    with pytest.raises(ConfigError, match="returned nan; rewards must be finite numbers"):
        make_reward(RewardSettings(kind="function", function="wmtp_test_reward_module:nan"))(examples)
    with pytest.raises(ConfigError, match="has no function `missing`"):
        make_reward(RewardSettings(kind="function", function="wmtp_test_reward_module:missing"))
    with pytest.raises(ConfigError, match="`no_such_module_xyz:f`: cannot import `no_such_module_xyz`"):
        make_reward(RewardSettings(kind="function", function="no_such_module_xyz:f"))
