"""Self-speculative decoding: the same tokens as Hugging Face greedy `generate`, with honest statistics, for parallel
heads (transformer, linear) and for the chain drafts of sequential depths."""

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
    assert all(r is None or 0.0 <= r <= 1.0 for r in result.acceptance_rates)
    # a head that proposed nothing has no rate (not measured), never 0
    assert [r is None for r in result.acceptance_rates] == [p == 0 for p in result.proposed]
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
@pytest.mark.parametrize("head_type", ["transformer", "linear", "sequential"])
def test_random_heads_match_greedy(arch, head_type):
    model = randomise_heads(mtp_model(arch, head_type))
    total = run_and_compare(model, random_prompts(20, seed=1))
    assert sum(total.proposed) > 0


@pytest.mark.parametrize("head_type", ["transformer", "linear", "sequential"])
def test_trained_heads_accept_several_tokens_and_match_greedy(head_type):
    total = run_and_compare(trained(head_type), cycle_prompts(24, seed=2))
    assert total.mean_accepted_length > 1.5
    assert total.accepted[-1] > 0  # whole steps of N_HEADS tokens happened
    assert sum(total.accepted) < sum(total.proposed)  # and rejections


@pytest.mark.parametrize("head_type", ["transformer", "linear", "sequential"])
def test_last_head_wrong_crops_every_step(head_type):
    """Heads 1..2 right, head 3 random: nearly every step accepts two drafts and crops one from every cache."""
    model = randomise_heads(trained(head_type), slice(-1, None))
    total = run_and_compare(model, cycle_prompts(20, seed=3))
    rates = total.acceptance_rates
    assert rates[0] > 0.8 and rates[1] > 0.8 and rates[2] < 0.3, rates
    assert total.mean_accepted_length > 1.5


@pytest.mark.parametrize("head_type", ["transformer", "sequential"])
def test_fewer_drafts_than_heads(head_type):
    total = run_and_compare(trained(head_type), cycle_prompts(20, seed=4), n_draft=2)
    assert len(total.proposed) == 2 and total.mean_accepted_length > 1.5


@pytest.mark.parametrize("head_type", ["transformer", "linear", "sequential"])
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


@pytest.mark.parametrize("head_type", ["transformer", "sequential"])
def test_never_more_than_max_new_tokens(head_type):
    model = trained(head_type)
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


def test_chain_drafting_refuses_mixed_layer_types():
    """The depths' mask comes from what the base model gives its first layer; with sliding and full layers mixed
    that need not be the last layer's (the one the depths copy)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                         max_window_layers=1, layer_types=["sliding_attention", "full_attention"])
    model = MTPModel.from_base(Qwen2ForCausalLM(config), n_heads=2, head_type="sequential").eval()
    with pytest.raises(ValueError, match="mixes layer types"):
        speculative_generate(model, torch.randint(3, VOCAB, (1, 5)), 4)
    assert len(speculative_generate(model, torch.randint(3, VOCAB, (1, 5)), 4, n_draft=0).tokens) == 4


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


@pytest.mark.parametrize("arch,head_type", [("llama", "transformer"), ("llama", "linear"), ("gpt2", "transformer"),
                                            ("llama", "sequential"), ("gpt2", "sequential")])
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


def chain_distribution(model: MTPModel, prompt: list[int], vocab: int, length: int, temperature: float,
                       ) -> torch.Tensor:
    """The same for sequential depths: x_1 from head 0, then x_{1+h} from depth h at the prompt's last position
    given x_1…x_h (depth h there reads the embedding of x_h and depth h-1's state), from one forward over every
    continuation: p(x_1) · q_1(x_2 | x_1) · q_2(x_3 | x_1, x_2) ⋯"""
    sequences = torch.cartesian_prod(*[torch.arange(vocab)] * length).view(-1, length)
    ids = torch.cat([torch.tensor(prompt).expand(len(sequences), -1), sequences[:, :-1]], dim=1)
    with torch.no_grad():
        logits = model(ids, return_logits=True).logits[:, len(prompt) - 1, :length].float()  # [N, length, V]
    logp = torch.log_softmax(logits / temperature, -1).gather(2, sequences[..., None])[..., 0]
    return logp.sum(1).exp()


@pytest.mark.parametrize("head_type", ["transformer", "sequential"])
def test_speculative_sampling_follows_the_base_model_distribution(head_type):
    """Counting on a 6-token vocabulary: 3 tokens sampled self-speculatively (2 heads or depths drafting, so drafts
    are accepted, rejected and resampled) follow the base model's exact joint at T = 0.7 (chi-square over the 216
    sequences), while the drafters' own joint, which an unchecked decoder would produce, is clearly rejected by the
    same test: it has the power to see the difference."""
    from scipy.stats import chisquare

    vocab, length, temperature = 6, 3, 0.7
    torch.manual_seed(0)
    model = randomise_heads(MTPModel.from_base(tiny_llama(vocab=vocab), n_heads=3, head_type=head_type).eval(),
                            seed=1)
    prompt = [3, 1, 4, 1, 5]
    exact = exact_distribution(model, prompt, vocab, length, temperature)
    if head_type == "sequential":
        unchecked = chain_distribution(model, prompt, vocab, length, temperature)
    else:
        unchecked = head_distribution(model, prompt, length, temperature)
    assert (exact - unchecked).abs().sum() > 0.2  # the drafters propose from a different distribution
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
@pytest.mark.parametrize("head_type", ["transformer", "sequential"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_greedy(dtype, head_type):
    model = trained(head_type).to("cuda", dtype)
    prompts = [(prompt.cuda(), max_new) for prompt, max_new in cycle_prompts(20, seed=8)]
    assert run_and_compare(model, prompts).mean_accepted_length > 1.5


def chain_reference(model: MTPModel, prompts: list[list[int]], max_new_tokens: int,
                    draft_states: list[torch.Tensor] | None = None) -> list[SpeculativeResult]:
    """Greedy chain drafting written from the definition with whole-sequence forwards and no cache: after each
    verify, depth j drafts d_j = argmax of its logits at the last verified position m-1 of one forward over
    x[0…m] + d_1…d_{j-1} (at m-1 it reads emb(x[m]) for j = 1, emb(d_{j-1}) and depth j-1's state after; at earlier
    positions the accepted tokens, as in training); head 0 then verifies the drafts with one more forward. Rows
    step together, each step drafting as many tokens as the row with most tokens still to go can use, as the
    batched decoder does. `draft_states` (a list) receives each depth's normed state [D] that a draft was read
    from, in the order drafted."""
    n_draft = model.n_heads - 1
    results = [SpeculativeResult([], 1, [0] * n_draft, [0] * n_draft) for _ in prompts]

    def states(tokens: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.stack(model.head_hidden_states(torch.tensor([tokens]))[0], dim=2)[0]  # [S, n, D]

    def logits(tokens: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model.unembedding(states(tokens))  # [S, n, V]

    rows = [list(p) + [int(logits(p)[-1, 0].argmax())] for p in prompts]
    for x, result in zip(rows, results, strict=True):
        result.tokens.append(x[-1])
    while active := [b for b, r in enumerate(results) if len(r.tokens) < max_new_tokens]:
        width = max(0, min(n_draft, max(max_new_tokens - len(results[b].tokens) for b in active) - 1))
        for b in active:
            x, result = rows[b], results[b]
            m, drafts = len(x) - 1, []
            for j in range(1, n_draft + 1):
                state = states(x + drafts)[m - 1, j]
                drafts.append(int(model.unembedding(state).argmax()))
                if draft_states is not None:
                    draft_states.append(state)
            drafts = drafts[:width]
            target = logits(x + drafts)[m:, 0].argmax(-1).tolist()  # head 0's choices for x[m+1…]
            accepted = 0
            while accepted < len(drafts) and drafts[accepted] == target[accepted]:
                accepted += 1
            result.forward_passes += 1
            for h in range(min(accepted + 1, len(drafts))):
                result.proposed[h] += 1
                result.accepted[h] += h < accepted
            emitted = drafts[:accepted] + [target[accepted]]
            x += emitted
            result.tokens.extend(emitted[:max_new_tokens - len(result.tokens)])
    return results


def test_chain_drafts_equal_whole_sequence_forwards():
    """The depth caches hold what the depths compute in training: every draft of the cached chain decoder is read
    from the state the cache-free reference above computes (to rounding), and it proposes and accepts exactly what
    the reference does, in every count, alone and in a batch (rows of different lengths, so the depths' committed
    columns differ by row). The model is trained briefly, so its depths draft right often but not always: drafts
    are rejected, and a cache entry left from a rejected draft would show in a later state."""
    model = train_on_cycle(mtp_model("llama", "sequential"), steps=10)
    prompts = cycle_prompts(10, seed=12)

    def counts(result: SpeculativeResult) -> tuple:
        return result.tokens, result.forward_passes, result.proposed, result.accepted

    # One row: each depth's call covers the positions it (re)computes, and its last one is the draft's.
    drafted: list[torch.Tensor] = []
    hooks = [depth.register_forward_hook(lambda _m, _a, out: drafted.append(out[1][0, -1])) for depth in model.heads]
    accepted = proposed = 0
    for prompt, max_new in prompts:
        drafted.clear()
        alone = speculative_generate(model, prompt, max_new)
        fast_states = list(drafted)
        for hook in hooks:
            hook.remove()
        reference_states: list[torch.Tensor] = []
        reference = chain_reference(model, [prompt[0].tolist()], max_new, reference_states)[0]
        hooks = [depth.register_forward_hook(lambda _m, _a, out: drafted.append(out[1][0, -1]))
                 for depth in model.heads]
        assert counts(alone) == counts(reference), prompt.tolist()
        assert len(fast_states) == len(reference_states) == (alone.forward_passes - 1) * (N_HEADS - 1)
        if fast_states:
            torch.testing.assert_close(torch.stack(fast_states), torch.stack(reference_states), rtol=0, atol=1e-5)
        accepted, proposed = accepted + sum(alone.accepted), proposed + sum(alone.proposed)
    for hook in hooks:
        hook.remove()
    assert 0.2 * proposed < accepted < 0.8 * proposed  # drafts both accepted and rejected: the counts carry weight
    rows = [p[0].tolist() for p, _ in prompts]
    for got, expected in zip(speculative_generate_batch(model, rows, 16), chain_reference(model, rows, 16),
                             strict=True):
        assert counts(got) == counts(expected)
