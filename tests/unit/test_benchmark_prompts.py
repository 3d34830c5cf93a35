"""Prompts as the model was trained: training rows, GRPO rollouts, evaluation prompts and the speculative statistics
start the same way (a bos token exactly when the tokenizer itself adds one); a prompt too long for the model's
positions is cut with one wmtp warning."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.models import tiny_llama
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

import wmtp.evaluate.speculative as speculative
from wmtp import MTPModel
from wmtp.data.sequences import bos_prefix, tokenize_examples, train_bpe_tokenizer
from wmtp.data.sources import Example
from wmtp.evaluate.checkpoint_eval import speculative_statistics
from wmtp.evaluate.generation import generate_samples
from wmtp.evaluate.settings import Sampling
from wmtp.execution.problems import Problem
from wmtp.weighting.grpo import usable_prompts

TEXTS = ["def f(x):\n    return x + 1\n" * 50, "print('hello world')\n" * 50]
PROMPT = "def f(x):\n"


def _tokenizers() -> dict[str, PreTrainedTokenizerFast]:
    """`names-bos`: GPT-2 / SmolLM2 style, `<|endoftext|>` is named bos but `tokenizer(text)` adds nothing;
    `adds-bos`: Llama style, a post-processor puts `<s>` before every text; `no-bos`: no bos token at all."""
    names = train_bpe_tokenizer(TEXTS, 300, 2)
    backend = copy.deepcopy(names.backend_tokenizer)
    backend.add_special_tokens(["<s>"])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                           special_tokens=[("<s>", backend.token_to_id("<s>"))])
    adds = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|endoftext|>",
                                   pad_token="<|pad|>")
    none = PreTrainedTokenizerFast(tokenizer_object=copy.deepcopy(names.backend_tokenizer),
                                   eos_token="<|endoftext|>", pad_token="<|pad|>")
    return {"names-bos": names, "adds-bos": adds, "no-bos": none}


TOKENIZERS = _tokenizers()
EXPECTED_START = {"names-bos": [], "adds-bos": [TOKENIZERS["adds-bos"].convert_tokens_to_ids("<s>")], "no-bos": []}


def test_the_rule_is_the_tokenizers_own_behaviour():
    for name, tokenizer in TOKENIZERS.items():
        assert bos_prefix(tokenizer) == EXPECTED_START[name], name
        own = tokenizer(PROMPT)["input_ids"]  # the tokenizer's default, as the standard harness encodes prompts
        assert own == bos_prefix(tokenizer) + tokenizer(PROMPT, add_special_tokens=False)["input_ids"], name


def _model(tokenizer) -> MTPModel:
    return MTPModel.from_base(tiny_llama(vocab=len(tokenizer)), n_heads=2).eval()


def _spy_generate(model: MTPModel) -> list[torch.Tensor]:
    """The input_ids of every `model.generate` call (the real one runs)."""
    seen: list[torch.Tensor] = []
    real = model.generate

    def generate(**kwargs):
        seen.append(kwargs["input_ids"])
        return real(**kwargs)

    model.generate = generate
    return seen


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_training_rollout_eval_and_speculative_prompts_start_the_same_way(name, monkeypatch):
    tokenizer = TOKENIZERS[name]
    text = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    start = EXPECTED_START[name] + text
    (row, n_prompt), = tokenize_examples([Example(PROMPT, "    return x\n", "s", "a")], tokenizer)
    assert row[:len(start)] == start and n_prompt == len(start)
    _, (rollout,) = usable_prompts([Example(PROMPT, "    return x\n", "s", "a")], tokenizer, room=64)
    assert rollout == start
    model = _model(tokenizer)
    seen = _spy_generate(model)
    generate_samples(model, tokenizer, [Problem("humaneval", "t", PROMPT, {}, "")], Sampling(max_new_tokens=2),
                     device=torch.device("cpu"))
    assert seen[0][0].tolist() == start
    spec_prompts: list[list[int]] = []
    real = speculative.speculative_generate

    def spy(model, input_ids, *args, **kwargs):
        spec_prompts.append(input_ids[0].tolist())
        return real(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(speculative, "speculative_generate", spy)
    speculative_statistics(model, tokenizer, [Problem("humaneval", "t", PROMPT, {}, "")], 2, torch.device("cpu"), None)
    assert spec_prompts == [start]


def test_a_prompt_longer_than_the_positions_is_cut_with_one_wmtp_warning(capfd):
    """The tiny model has 128 positions; with 8 new tokens a prompt keeps its last 120 tokens (the end is where
    the completion continues), and one line on stderr says how many prompts were cut."""
    tokenizer = TOKENIZERS["names-bos"]
    prompts = ["x = 1\n" * 100, "y = 2\n" * 60, PROMPT]
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert lengths[0] > 120 and lengths[1] > 120 and lengths[2] < 120
    model = _model(tokenizer)
    seen = _spy_generate(model)
    problems = [Problem("humaneval", f"t{i}", p, {}, "") for i, p in enumerate(prompts)]
    records = generate_samples(model, tokenizer, problems, Sampling(max_new_tokens=8, batch_size=4),
                               device=torch.device("cpu"))
    assert len(records) == 3 and max(ids.shape[1] for ids in seen) == 120
    longest = tokenizer(prompts[0], add_special_tokens=False)["input_ids"]
    assert any(row[-120:].tolist() == longest[-120:] for ids in seen for row in ids)
    err = capfd.readouterr().err
    assert err.count("wmtp: warning:") == 1
    assert "2 of 3 prompts" in err and "128 positions" in err and "--max-new-tokens 8" in err
    assert "transformers" not in err and "maximum length" not in err


def test_no_room_for_a_prompt_is_a_one_line_error():
    from wmtp.config import ConfigError

    tokenizer = TOKENIZERS["names-bos"]
    with pytest.raises(ConfigError, match=r"--max-new-tokens 128 leaves no room for a prompt in the model's 128 "):
        generate_samples(_model(tokenizer), tokenizer, [Problem("humaneval", "t", PROMPT, {}, "")],
                         Sampling(max_new_tokens=128), device=torch.device("cpu"))
