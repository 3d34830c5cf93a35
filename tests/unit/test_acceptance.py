"""Teacher-forced acceptance per depth (docs/method.md §6) against a plain loop over positions on random logits:
document boundaries, padding, prompts, a depth with no eligible position, one head; and the greedy tokens of
every head type against the argmax of the full logits."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from helpers.models import perturb_heads, tiny_llama

from wmtp.components.acceptance import acceptance_counts, acceptance_report, greedy_tokens, tokens_per_forward
from wmtp.components.validate import head_quality, quality_metric_names, quality_metrics
from wmtp.data.sequences import SequenceSet
from wmtp.loss import IGNORE_INDEX, mtp_labels
from wmtp.model.mtp import MTPModel
from wmtp.runtime.distributed import DistInfo


def reference_counts(logits: torch.Tensor, labels: torch.Tensor) -> list[tuple[int, int]]:
    """(eligible, accepted) per depth k = 1…n-1, position by position: the draft of head k at t is its argmax, head
    0's own token for x[t+k+1] is head 0's argmax at t+k; depth k counts at t when depths 1…k-1 were accepted there
    and both pairs have a label."""
    batch, seq, n, _ = logits.shape
    counts = []
    for k in range(1, n):
        eligible = accepted = 0
        for b in range(batch):
            for t in range(seq - k):
                earlier = all(labels[b, t, j] != IGNORE_INDEX and labels[b, t + j, 0] != IGNORE_INDEX
                              and logits[b, t, j].argmax() == logits[b, t + j, 0].argmax() for j in range(1, k))
                if earlier and labels[b, t, k] != IGNORE_INDEX and labels[b, t + k, 0] != IGNORE_INDEX:
                    eligible += 1
                    accepted += int(logits[b, t, k].argmax() == logits[b, t + k, 0].argmax())
        counts.append((eligible, accepted))
    return counts


def packed_labels(seq: int, n: int, seed: int = 0, *, prompt: bool = False) -> torch.Tensor:
    """Labels of 3 rows: one with two packed documents, one right-padded, one plain (prompt tokens masked too)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 50, (3, seq), generator=g)
    mask = torch.ones(3, seq, dtype=torch.long)
    mask[1, seq - 5:] = 0
    docs = torch.zeros(3, seq, dtype=torch.long)
    docs[0, seq // 2:] = 1
    prompt_mask = torch.zeros(3, seq, dtype=torch.bool)
    if prompt:
        prompt_mask[2, :4] = True
    return mtp_labels(ids, n, attention_mask=mask, document_ids=docs, prompt_mask=prompt_mask)


def agreeing_logits(labels: torch.Tensor, vocab: int, agree: float, seed: int) -> torch.Tensor:
    """Random logits [B, S, n, V] whose draft heads copy head 0's logits at t+k with probability `agree`, so that
    every depth sees both outcomes."""
    g = torch.Generator().manual_seed(seed)
    batch, seq, n = labels.shape
    logits = torch.randn(batch, seq, n, vocab, generator=g)
    for k in range(1, n):
        copy = torch.rand(batch, seq - k, generator=g) < agree
        logits[:, : seq - k, k][copy] = logits[:, k:, 0][copy]
    return logits


@pytest.mark.parametrize("n, seed, prompt", [(2, 0, False), (4, 1, False), (4, 2, True), (5, 3, True)])
def test_counts_match_a_loop_over_positions(n, seed, prompt):
    labels = packed_labels(20, n, seed, prompt=prompt)
    logits = agreeing_logits(labels, 11, 0.7, seed)
    greedy = torch.where(labels != IGNORE_INDEX, logits.argmax(-1), -1)
    counts = acceptance_counts(greedy, labels != IGNORE_INDEX)
    expected = reference_counts(logits, labels)
    assert [(int(e), int(a)) for e, a in counts.t()] == expected
    assert all(0 < a < e for e, a in expected[:2])  # the test sees acceptances and rejections


def test_a_document_boundary_and_padding_end_the_chain():
    """One row of 10: document A is x0…x4, document B x5…x7, x8 and x9 padding; every draft agrees with head 0. Depth
    k counts at t exactly when x[t+k+1] is in t's document: A gives 3, 2, 1 positions for k = 1, 2, 3, B 1, 0, 0."""
    ids = torch.arange(3, 13).view(1, 10)
    labels = mtp_labels(ids, 4, attention_mask=torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 0, 0]]),
                        document_ids=torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1, 1]]))
    greedy = torch.zeros(1, 10, 4, dtype=torch.long)  # every head, every position: token 0
    counts = acceptance_counts(greedy, labels != IGNORE_INDEX)
    assert counts.tolist() == [[4.0, 2.0, 1.0], [4.0, 2.0, 1.0]]
    greedy[0, 1, 1] = 5  # depth 1 rejected at t = 1: depths 2 and 3 are no longer tried there
    counts = acceptance_counts(greedy, labels != IGNORE_INDEX)
    assert counts.tolist() == [[4.0, 1.0, 1.0], [3.0, 1.0, 1.0]]
    report = acceptance_report(counts)
    assert [d["rate"] for d in report["depths"]] == [0.75, 1.0, 1.0]
    assert report["tokens_per_forward"] == pytest.approx(1 + 0.75 + 0.75 + 0.75)


def test_a_depth_without_an_eligible_position_is_missing_not_zero():
    """Rows of 4 tokens: depth 3 (x[t+4]) has no target; its rate and the expected tokens per forward are absent."""
    labels = mtp_labels(torch.arange(3, 11).view(2, 4), 4)
    greedy = torch.zeros(2, 4, 4, dtype=torch.long)
    report = acceptance_report(acceptance_counts(greedy, labels != IGNORE_INDEX))
    assert [(d["eligible"], d["rate"]) for d in report["depths"]] == [(4, 1.0), (2, 1.0), (0, None)]
    assert report["tokens_per_forward"] is None
    nothing = acceptance_report(acceptance_counts(greedy, torch.zeros(2, 4, 4, dtype=torch.bool)))
    assert [d["rate"] for d in nothing["depths"]] == [None, None, None] and nothing["tokens_per_forward"] is None


def test_one_head_has_nothing_to_report():
    labels = mtp_labels(torch.arange(3, 11).view(1, 8), 1)
    counts = acceptance_counts(torch.zeros(1, 8, 1, dtype=torch.long), labels != IGNORE_INDEX)
    assert counts.shape == (2, 0)
    assert acceptance_report(counts) == {"depths": [], "tokens_per_forward": None}


def test_tokens_per_forward_is_one_plus_the_sum_of_the_running_products():
    assert tokens_per_forward([0.5, 0.4, 0.25]) == pytest.approx(1 + 0.5 + 0.2 + 0.05)
    assert tokens_per_forward([1.0, 1.0]) == 3.0
    assert tokens_per_forward([0.0, None]) == 1.0  # depth 2 is never reached: its missing rate does not matter
    assert tokens_per_forward([0.5, None, 0.5]) is None
    assert tokens_per_forward([]) is None


@pytest.mark.parametrize("head_type", ["transformer", "linear", "sequential"])
def test_greedy_tokens_are_the_argmax_of_the_full_logits_for_every_head_type(head_type):
    model = MTPModel.from_base(tiny_llama(), n_heads=3, head_type=head_type).eval()
    perturb_heads(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 97, (2, 14), generator=g)
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[1, 10:] = 0
    labels = mtp_labels(ids, 3, attention_mask=mask)
    with torch.no_grad():
        hidden, _ = model.head_hidden_states(ids, mask)
        logits = model(ids, mask, return_logits=True).logits
    tokens = greedy_tokens(hidden, model.unembedding.weight, labels, bias=model.unembedding.bias, chunk_size=5)
    valid = labels != IGNORE_INDEX
    assert torch.equal(tokens[valid], logits.argmax(-1)[valid])
    assert bool((tokens[~valid] == -1).all())


def held_out(n: int = 5, length: int = 24, vocab: int = 8, seed: int = 0) -> SequenceSet:
    """Rows over a small vocabulary (so that drafts agree often enough to reach every depth), with padding, a packed
    second document and a prompt."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, 18:] = 0
    docs = torch.zeros(n, length, dtype=torch.long)
    docs[1, 10:] = 1
    prompt = torch.zeros(n, length, dtype=torch.bool)
    prompt[2, :6] = True
    return SequenceSet(ids, mask, docs, prompt)


def reference_report(model: MTPModel, data: SequenceSet, mask_prompt: bool) -> list[tuple[int, int]]:
    labels = mtp_labels(data.input_ids, model.n_heads, attention_mask=data.attention_mask,
                        document_ids=data.document_ids, prompt_mask=data.prompt_mask if mask_prompt else None)
    with torch.no_grad():
        logits = model(data.input_ids, data.attention_mask, return_logits=True).logits
    return reference_counts(logits, labels)


@pytest.mark.parametrize("head_type, mask_prompt", [("transformer", False), ("linear", True),
                                                    ("sequential", False)])
def test_head_quality_reports_the_acceptance_of_the_full_logits_for_every_head_type(head_type, mask_prompt):
    """head_quality takes acceptance in its own forward; micro-batches of 2 add up to the counts of the whole set."""
    model = MTPModel.from_base(tiny_llama(vocab=8), n_heads=4, head_type=head_type).eval()
    perturb_heads(model)
    data = held_out()
    expected = reference_report(model, data, mask_prompt)
    report = head_quality(model, data, batch_size=2, mask_prompt=mask_prompt, chunk_size=7)["acceptance"]
    assert [(d["eligible"], d["accepted"]) for d in report["depths"]] == expected
    assert expected[1][1] > 0  # the comparison reaches depth 2 with acceptances
    rates = [a / e if e else None for e, a in expected]
    assert [d["rate"] for d in report["depths"]] == rates
    metrics = quality_metrics(head_quality(model, data, batch_size=5, mask_prompt=mask_prompt))
    assert [metrics.get(f"val/acceptance_head{k}") for k in (1, 2, 3)] == pytest.approx(rates)
    assert metrics["val/tokens_per_forward"] == pytest.approx(tokens_per_forward(rates))


def test_head_quality_sums_counts_over_ranks(monkeypatch):
    """Two ranks take alternate micro-batches; the all-reduced counts of either give the one-process report (a mean
    of the ranks' rates would not: their eligible counts differ)."""
    import wmtp.components.validate as validate

    model = MTPModel.from_base(tiny_llama(vocab=8), n_heads=3, head_type="linear").eval()
    perturb_heads(model)
    data = held_out(n=5)
    whole = head_quality(model, data, batch_size=2)["acceptance"]
    local: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    for rank in (0, 1):
        monkeypatch.setattr(validate, "all_reduce_sum", lambda t, info: local[info.rank].append(t.clone()) or t)
        head_quality(model, data, batch_size=2, info=DistInfo(rank, 2, rank, torch.device("cpu")))
    assert local[0][1][0].tolist() != local[1][1][0].tolist()  # the ranks saw different eligible counts
    calls = iter(local[1])
    monkeypatch.setattr(validate, "all_reduce_sum", lambda t, info: t.add_(next(calls)))
    summed = head_quality(model, data, batch_size=2, info=DistInfo(0, 2, 0, torch.device("cpu")))["acceptance"]
    assert summed == whole


def test_head_quality_with_one_head_reports_no_acceptance():
    model = MTPModel.from_base(tiny_llama(vocab=8), n_heads=1).eval()
    report = head_quality(model, held_out(n=3))
    assert report["acceptance"] == {"depths": [], "tokens_per_forward": None}
    assert not [name for name in quality_metrics(report) if "acceptance" in name or "per_forward" in name]
    assert quality_metric_names(1) == ["val/loss", "val/ce_head0", "val/ppl_head0", "val/acc_head0"]
    assert quality_metric_names(3)[-3:] == ["val/acceptance_head1", "val/acceptance_head2", "val/tokens_per_forward"]


def test_method_md_states_the_formula_and_a_worked_example_the_code_gives():
    """docs/method.md §6: the definition's names and its worked example, τ for a = (0.5, 0.4, 0.25)."""
    text = " ".join((Path(__file__).resolve().parents[2] / "docs" / "method.md").read_text().split())
    paragraph = text[text.index("**Teacher-forced acceptance**"):text.index("**Self-speculative decoding**")]
    rates, stated = re.search(r"With a = \(([0-9., ]+)\), τ = 1 \+ [0-9.+ ]+ = ([0-9]+\.[0-9]+)", paragraph).groups()
    assert tokens_per_forward([float(a) for a in rates.split(",")]) == pytest.approx(float(stated))
    assert "a_k = A_k / E_k" in paragraph and "τ = 1 + Σ_{k=1}^{n−1} Π_{j≤k} a_j" in paragraph
    assert "g[t,k] = g[t+k,0]" in paragraph and "m[t+k,0] = 1" in paragraph
    for name in ("val/acceptance_head{k}", "val/tokens_per_forward"):
        assert name in paragraph


def test_report_and_mlflow_metrics_show_an_unmeasured_depth_as_missing():
    from wmtp.evaluate.checkpoint_eval import flat_metrics
    from wmtp.evaluate.report import markdown

    heads = {"heads": [], "buckets": [], "acceptance": {"depths": [
        {"depth": 1, "eligible": 4, "accepted": 3, "rate": 0.75},
        {"depth": 2, "eligible": 0, "accepted": 0, "rate": None}], "tokens_per_forward": None}}
    text = markdown(["a", "old"], [{"heads": heads}, {"heads": {"heads": [], "buckets": []}}])
    assert "| a | 0.750 (3/4) | — | — |" in text and "| old |" not in text.split("Teacher-forced")[1]
    assert flat_metrics({"heads": heads}) == {"eval/acceptance_head1": 0.75}
