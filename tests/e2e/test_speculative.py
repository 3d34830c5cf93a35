"""Self-speculative decoding: the same tokens as Hugging Face greedy `generate`, with honest statistics."""

import copy
import math

import pytest
import torch
from helpers.models import VOCAB, tiny_gpt2, tiny_llama
from transformers import GenerationConfig

from wmtp import MTPLoss, MTPModel, mtp_labels
from wmtp.evaluate.speculative import SpeculativeResult, speculative_generate, speculative_generate_batch

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
        loss = model(x, objective=MTPLoss(mtp_labels(x, model.n_heads))).loss
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


@pytest.mark.parametrize("arch,head_type", [("llama", "transformer"), ("llama", "linear"), ("gpt2", "transformer")])
def test_batched_rows_equal_greedy_each(arch, head_type):
    """Rows of different prompt lengths and different acceptance, in one batch: every row's tokens are its own
    greedy decoding (alone, no padding), with and without an eos; rows accept different numbers of drafts."""
    model = trained(head_type) if arch == "llama" else mtp_model(arch, head_type)
    prompts = cycle_prompts(9, seed=11)
    for eos in (None, int(CYCLE[4])):
        results = speculative_generate_batch(model, [p[0].tolist() for p, _ in prompts], 20, eos_token_id=eos)
        for (prompt, _), result in zip(prompts, results, strict=True):
            assert result.tokens == greedy(model, prompt, 20, eos_token_id=eos), prompt.tolist()
            check_counts(result, eos_stopped=True)
    if arch == "llama":
        per_row = {round(r.mean_accepted_length, 3) for r in results}
        assert len(per_row) > 1 and max(per_row) > 1.5  # rows really did accept different lengths


def exact_distribution(model: MTPModel, prompt: list[int], vocab: int, length: int, temperature: float) -> torch.Tensor:
    """P(x_1…x_length | prompt) of the base model at `temperature` over every sequence, from one batched forward."""
    sequences = torch.cartesian_prod(*[torch.arange(vocab)] * length).view(-1, length)
    ids = torch.cat([torch.tensor(prompt).expand(len(sequences), -1), sequences], dim=1)
    with torch.no_grad():
        logits = model.base(ids).logits[:, len(prompt) - 1:-1].float()
    logp = torch.log_softmax(logits / temperature, -1).gather(2, sequences[..., None])[..., 0]
    return logp.sum(1).exp()


def head_distribution(model: MTPModel, prompt: list[int], length: int, temperature: float) -> torch.Tensor:
    """The joint a decoder that accepted every draft unchecked would sample: x_1 from head 0, x_{1+h} from head h,
    all at the prompt's last position (the heads do not see the tokens drafted before theirs)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), return_logits=True).logits[0, -1, :length].float()
    probs = torch.softmax(logits / temperature, -1)
    joint = probs[0]
    for h in range(1, length):
        joint = (joint[:, None] * probs[h][None, :]).flatten()
    return joint


def test_speculative_sampling_follows_the_base_model_distribution():
    """Counting on a 6-token vocabulary: 3 tokens sampled self-speculatively (3 heads drafting, so drafts are
    accepted, rejected and resampled) follow the base model's exact joint at T = 0.7 (chi-square over the 216
    sequences), while the heads' own joint, which an unchecked decoder would produce, is clearly rejected by the
    same test: it has the power to see the difference."""
    from scipy.stats import chisquare

    vocab, length, temperature = 6, 3, 0.7
    torch.manual_seed(0)
    model = randomise_heads(MTPModel.from_base(tiny_llama(vocab=vocab), n_heads=3).eval(), seed=1)
    prompt = [3, 1, 4, 1, 5]
    exact = exact_distribution(model, prompt, vocab, length, temperature)
    unchecked = head_distribution(model, prompt, length, temperature)
    assert (exact - unchecked).abs().sum() > 0.3  # the heads propose from a different distribution
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(vocab ** length)
    accepted = proposed = 0
    for _ in range(4):
        for result in speculative_generate_batch(model, [prompt] * 3000, length, temperature=temperature,
                                                 generator=generator):
            index = sum(t * vocab ** (length - 1 - i) for i, t in enumerate(result.tokens))
            counts[index] += 1
            accepted, proposed = accepted + sum(result.accepted), proposed + sum(result.proposed)
    assert 0 < accepted < proposed  # drafts were accepted and rejected
    n = counts.sum()
    keep = exact * n >= 5  # chi-square needs expected counts of about 5 or more; the rest are pooled in one bin

    def bins(values: torch.Tensor) -> torch.Tensor:
        return torch.cat([values[keep], values[~keep].sum().view(1)]) if (~keep).any() else values[keep]

    observed = bins(counts).double()
    for expected, must_fit in ((exact, True), (unchecked, False)):
        pooled = bins(expected.double())
        pooled = pooled * n / pooled.sum()
        p_value = chisquare(observed.numpy(), pooled.numpy()).pvalue
        assert (p_value > 1e-3) if must_fit else (p_value < 1e-9), (must_fit, p_value)


def test_sampling_is_seeded_and_greedy_at_zero_temperature():
    model = trained("linear")
    prompt = CYCLE[:4].unsqueeze(0)
    a, b = (speculative_generate(model, prompt, 12, temperature=1.0, generator=torch.Generator().manual_seed(3))
            for _ in range(2))
    assert a.tokens == b.tokens and len(a.tokens) == 12
    assert speculative_generate(model, prompt, 12, temperature=0.0).tokens == greedy(model, prompt, 12)
    with pytest.raises(ValueError, match="temperature"):
        speculative_generate(model, prompt, 4, temperature=-1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_greedy(dtype):
    model = trained("transformer").to("cuda", dtype)
    prompts = [(prompt.cuda(), max_new) for prompt, max_new in cycle_prompts(20, seed=8)]
    assert run_and_compare(model, prompts).mean_accepted_length > 1.5
