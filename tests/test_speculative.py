"""Self-speculative decoding: the same tokens as Hugging Face greedy `generate`, with honest statistics."""

import copy
import math

import pytest
import torch
from conftest import VOCAB, tiny_gpt2, tiny_llama
from transformers import GenerationConfig

from wmtp import MTPModel, mtp_labels
from wmtp.evaluate.speculative import SpeculativeResult, speculative_generate

N_HEADS = 4
# A fixed cycle of distinct ordinary tokens (ids 0-2 are pad/bos/eos): a model trained on it predicts every
# continuation inside the cycle, so trained heads draft correctly and steps accept several tokens.
CYCLE = torch.randperm(VOCAB - 3, generator=torch.Generator().manual_seed(0))[:11] + 3
BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def mtp_model(arch: str, head_type: str, n_heads: int = N_HEADS) -> MTPModel:
    base = BUILDERS[arch]()
    # The tiny configs name eos 2; `generate` would stop there even with eos_token_id=None, because it falls
    # back to the model's generation config. The reference must stop only where a test asks it to.
    base.generation_config.eos_token_id = None
    return MTPModel.from_base(base, n_heads=n_heads, head_type=head_type).eval()


def randomise_heads(model: MTPModel, heads: slice = slice(None), seed: int = 0) -> MTPModel:
    """Draft heads with random weights: their drafts are (nearly) always wrong."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for head in model.heads[heads]:
            for p in head.parameters():
                p.normal_(0.0, 0.3)
    return model


def train_on_cycle(model: MTPModel, steps: int = 120) -> MTPModel:
    """A few seconds of MTP training on windows of CYCLE: afterwards every head continues the cycle."""
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        start = torch.randint(0, len(CYCLE), (16, 1), generator=generator)
        x = CYCLE[(start + torch.arange(24)) % len(CYCLE)]
        loss = model(x, labels=mtp_labels(x, model.n_heads)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


_TRAINED: dict[str, MTPModel] = {}


def trained(head_type: str) -> MTPModel:
    """A Llama trained on CYCLE, built once per module run; tests get a copy they may change."""
    if head_type not in _TRAINED:
        _TRAINED[head_type] = train_on_cycle(mtp_model("llama", head_type))
    return copy.deepcopy(_TRAINED[head_type])


def random_prompts(n: int, seed: int) -> list[tuple[torch.Tensor, int]]:
    """(prompt [1, S] with S in 1..29, max_new_tokens in 1..24), random ordinary tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(1, 30, (1,), generator=g))
        out.append((torch.randint(3, VOCAB, (1, length), generator=g), int(torch.randint(1, 25, (1,), generator=g))))
    return out


def cycle_prompts(n: int, seed: int) -> list[tuple[torch.Tensor, int]]:
    """Prompts mixing a CYCLE fragment and random tokens (in either order; either may be empty, not both), and
    max_new_tokens in 1..29: the model must find its way into the cycle, so some drafts are rejected."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        noise = torch.randint(3, VOCAB, (int(torch.randint(0, 8, (1,), generator=g)),), generator=g)
        start = int(torch.randint(0, len(CYCLE), (1,), generator=g))
        length = int(torch.randint(1, 15, (1,), generator=g))
        fragment = CYCLE[(start + torch.arange(length)) % len(CYCLE)]
        prompt = torch.cat([fragment, noise] if i % 2 else [noise, fragment]).unsqueeze(0)
        out.append((prompt, int(torch.randint(1, 30, (1,), generator=g))))
    return out


def greedy(model: MTPModel, prompt: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
    """Hugging Face's own greedy decoding with the base model's KV cache: the reference."""
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_token_id,
                              pad_token_id=0)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
    return out[0, prompt.shape[1]:].tolist()


def check_counts(result: SpeculativeResult, eos_stopped: bool = False) -> None:
    """Statistics that must hold for every run."""
    assert math.isclose(result.forward_passes * result.mean_accepted_length, len(result.tokens))
    assert all(0 <= a <= p for a, p in zip(result.accepted, result.proposed, strict=True))
    # Draft h is verified only after drafts 1..h-1 were accepted.
    assert all(result.proposed[h] <= result.accepted[h - 1] for h in range(1, len(result.proposed)))
    assert all(0.0 <= r <= 1.0 for r in result.acceptance_rates)
    # Each forward emits its accepted drafts plus head 0's token; only an eos can cut a step short.
    emitted = result.forward_passes + sum(result.accepted)
    assert len(result.tokens) <= emitted if eos_stopped else len(result.tokens) == emitted


def run_and_compare(model: MTPModel, prompts: list[tuple[torch.Tensor, int]], **kwargs) -> SpeculativeResult:
    """Decode every prompt both ways, assert identical tokens; the pooled statistics."""
    total = None
    for prompt, max_new in prompts:
        result = speculative_generate(model, prompt, max_new, **kwargs)
        assert result.tokens == greedy(model, prompt, max_new), (prompt.tolist(), max_new)
        check_counts(result)
        if total is None:
            total = result
        else:
            total = SpeculativeResult(total.tokens + result.tokens, total.forward_passes + result.forward_passes,
                                      [a + b for a, b in zip(total.proposed, result.proposed, strict=True)],
                                      [a + b for a, b in zip(total.accepted, result.accepted, strict=True)])
    check_counts(total)
    return total


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("head_type", ["transformer", "linear"])
def test_random_heads_match_greedy(arch, head_type):
    model = randomise_heads(mtp_model(arch, head_type))
    total = run_and_compare(model, random_prompts(20, seed=1))
    assert sum(total.proposed) > 0


@pytest.mark.parametrize("head_type", ["transformer", "linear"])
def test_trained_heads_accept_several_tokens_and_match_greedy(head_type):
    total = run_and_compare(trained(head_type), cycle_prompts(24, seed=2))
    assert total.mean_accepted_length > 1.5
    assert total.accepted[-1] > 0  # whole steps of N_HEADS tokens happened
    assert sum(total.accepted) < sum(total.proposed)  # and rejections


@pytest.mark.parametrize("head_type", ["transformer", "linear"])
def test_last_head_wrong_crops_every_step(head_type):
    """Heads 1..2 right, head 3 random: nearly every step accepts two drafts and crops one from every cache."""
    model = randomise_heads(trained(head_type), slice(-1, None))
    total = run_and_compare(model, cycle_prompts(20, seed=3))
    rates = total.acceptance_rates
    assert rates[0] > 0.8 and rates[1] > 0.8 and rates[2] < 0.3, rates
    assert total.mean_accepted_length > 1.5


def test_fewer_drafts_than_heads():
    total = run_and_compare(trained("transformer"), cycle_prompts(20, seed=4), n_draft=2)
    assert len(total.proposed) == 2 and total.mean_accepted_length > 1.5


@pytest.mark.parametrize("head_type", ["transformer", "linear"])
def test_bfloat16_matches_greedy(head_type):
    total = run_and_compare(trained(head_type).to(torch.bfloat16), cycle_prompts(20, seed=5))
    assert total.mean_accepted_length > 1.5


def test_without_draft_heads_is_greedy():
    model = mtp_model("llama", "transformer", n_heads=1)
    total = run_and_compare(model, random_prompts(5, seed=6))
    assert total.proposed == [] and total.forward_passes == len(total.tokens)
    total = run_and_compare(trained("linear"), random_prompts(5, seed=6), n_draft=0)
    assert total.forward_passes == len(total.tokens)


def test_eos_stops_inside_a_multi_token_step():
    model = trained("transformer")
    stops = 0
    for prompt, _ in cycle_prompts(12, seed=7):
        reference = greedy(model, prompt, 24)
        for eos in dict.fromkeys(reference[2:6]):  # first occurrences, in order
            expected = reference[:reference.index(eos) + 1]
            result = speculative_generate(model, prompt, 24, eos_token_id=eos)
            assert result.tokens == expected == greedy(model, prompt, 24, eos_token_id=eos)
            check_counts(result, eos_stopped=True)
            stops += 1
    assert stops >= 12


def test_never_more_than_max_new_tokens():
    model = trained("transformer")
    prompt = CYCLE[:3].unsqueeze(0)
    reference = greedy(model, prompt, 16)
    for max_new in range(17):
        result = speculative_generate(model, prompt, max_new)
        assert result.tokens == reference[:max_new]
        check_counts(result)
        assert max_new <= 2 or result.forward_passes < max_new  # steps of several tokens


def test_mode_restored():
    model = trained("linear").train()
    model.base.eval()
    speculative_generate(model, CYCLE[:3].unsqueeze(0), 5)
    assert model.training and all(head.training for head in model.heads) and not model.base.training


def test_rejects_batches_and_bad_arguments():
    model = mtp_model("llama", "transformer")
    with pytest.raises(ValueError, match="batch size 1"):
        speculative_generate(model, torch.randint(3, VOCAB, (2, 5)), 4)
    with pytest.raises(ValueError, match=r"\[1, S\]"):
        speculative_generate(model, torch.randint(3, VOCAB, (5,)), 4)
    with pytest.raises(ValueError, match="n_draft"):
        speculative_generate(model, torch.randint(3, VOCAB, (1, 5)), 4, n_draft=N_HEADS)
    with pytest.raises(ValueError, match="max_new_tokens"):
        speculative_generate(model, torch.randint(3, VOCAB, (1, 5)), -1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_greedy(dtype):
    model = trained("transformer").to("cuda", dtype)
    prompts = [(prompt.cuda(), max_new) for prompt, max_new in cycle_prompts(20, seed=8)]
    assert run_and_compare(model, prompts).mean_accepted_length > 1.5
