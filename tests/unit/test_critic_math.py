"""The critic's targets and TD errors against plain per-document loops (docs/method.md §5.3)."""

from __future__ import annotations

import random

import pytest
import torch

from wmtp.data.sequences import build_sequences
from wmtp.weighting.critic.returns import (
    explained_variance,
    gae,
    mc_returns,
    td_errors,
    td_lambda_targets,
    token_rewards,
)


def packed_set(seed: int = 0, packing: bool = True, max_length: int = 12):
    rng = random.Random(seed)
    docs = [([rng.randrange(3, 50) for _ in range(rng.randint(2, 20))], 0) for _ in range(9)]
    seqs = build_sequences(docs, max_length, packing=packing, pad_id=0, seed=seed)
    rewards = torch.tensor([rng.uniform(-1, 2) for _ in docs])
    return seqs, rewards


def segments(seqs):
    """Per row: lists of columns of each document segment, in order."""
    out = []
    for r in range(seqs.input_ids.shape[0]):
        row, current, doc = [], [], None
        for c in range(seqs.input_ids.shape[1]):
            if not seqs.attention_mask[r, c]:
                break
            d = int(seqs.document_ids[r, c])
            if current and d != doc:
                row.append((doc, current))
                current = []
            doc = d
            current.append(c)
        if current:
            row.append((doc, current))
        out.append(row)
    return out


def stream_positions(seqs):
    """doc -> [(row, col)] in stream order."""
    where = {}
    for r, row in enumerate(segments(seqs)):
        for doc, cols in row:
            where.setdefault(doc, []).extend((r, c) for c in cols)
    return where


@pytest.mark.parametrize("packing", [True, False])
def test_rewards_sit_on_each_documents_last_token(packing):
    seqs, rewards = packed_set(packing=packing)
    tr = token_rewards(seqs, rewards)
    for doc, places in stream_positions(seqs).items():
        r, c = places[-1]
        assert tr.terminal[r, c] and tr.reward[r, c] == pytest.approx(float(rewards[doc]))
        for k, (r2, c2) in enumerate(places):
            assert int(tr.steps_to_end[r2, c2]) == len(places) - 1 - k
            assert float(tr.doc_reward[r2, c2]) == pytest.approx(float(rewards[doc]))
    assert int(tr.terminal.sum()) == len(stream_positions(seqs))
    assert float(tr.reward.sum()) == pytest.approx(sum(float(rewards[d]) for d in stream_positions(seqs)), rel=1e-5)
    assert not tr.reward[seqs.attention_mask == 0].any()


def test_truncated_marks_row_ends_whose_document_goes_on():
    seqs, rewards = packed_set()
    tr = token_rewards(seqs, rewards)
    expected = torch.zeros_like(tr.truncated)
    for row_index, row in enumerate(segments(seqs)):
        doc, cols = row[-1]
        if stream_positions(seqs)[doc][-1] != (row_index, cols[-1]):
            expected[row_index, cols[-1]] = True
    assert torch.equal(tr.truncated, expected) and expected.any()


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_monte_carlo_returns(gamma):
    seqs, rewards = packed_set(1)
    tr = token_rewards(seqs, rewards)
    target, mask = mc_returns(tr, seqs.attention_mask, gamma)
    for doc, places in stream_positions(seqs).items():
        big_t = len(places) - 1
        for k, (r, c) in enumerate(places):
            if k == big_t:
                assert not mask[r, c]
            else:
                assert mask[r, c]
                assert float(target[r, c]) == pytest.approx(gamma ** (big_t - k - 1) * float(rewards[doc]), rel=1e-5)


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.0), (0.97, 1.0), (0.8, 0.5)])
def test_td_lambda_targets_against_a_per_segment_loop(gamma, lam):
    seqs, rewards = packed_set(2)
    tr = token_rewards(seqs, rewards)
    values = torch.randn(seqs.input_ids.shape, generator=torch.Generator().manual_seed(3))
    targets, mask = td_lambda_targets(values, tr, seqs.attention_mask, seqs.document_ids, gamma, lam)
    for r, row in enumerate(segments(seqs)):
        for _, cols in row:
            last = cols[-1]
            g = {last: 0.0 if tr.terminal[r, last] else float(values[r, last])}
            assert not mask[r, last]
            for k in range(len(cols) - 2, -1, -1):
                t, nxt = cols[k], cols[k + 1]
                v_star = 0.0 if tr.terminal[r, nxt] else float(values[r, nxt])
                g[t] = float(tr.reward[r, nxt]) + gamma * ((1 - lam) * v_star + lam * g[nxt])
                assert mask[r, t]
                assert float(targets[r, t]) == pytest.approx(g[t], rel=1e-4, abs=1e-5)
    assert not mask[seqs.attention_mask == 0].any()


def test_lambda_one_inside_a_row_equals_monte_carlo():
    seqs, rewards = packed_set(4, max_length=64)
    tr = token_rewards(seqs, rewards)
    values = torch.randn(seqs.input_ids.shape)
    td, mask = td_lambda_targets(values, tr, seqs.attention_mask, seqs.document_ids, 0.9, 1.0)
    mc, _ = mc_returns(tr, seqs.attention_mask, 0.9)
    whole = torch.zeros_like(mask)  # documents that end inside their row and start in it
    for r, row in enumerate(segments(seqs)):
        for doc, cols in row:
            if stream_positions(seqs)[doc][0] == (r, cols[0]) and tr.terminal[r, cols[-1]]:
                whole[r, cols[:-1]] = True
    assert whole.any()
    torch.testing.assert_close(td[whole], mc[whole])


def test_td_errors_and_gae_against_loops():
    seqs, rewards = packed_set(5)
    tr = token_rewards(seqs, rewards)
    values = torch.randn(seqs.input_ids.shape, generator=torch.Generator().manual_seed(6))
    gamma, lam = 0.95, 0.8
    delta, defined = td_errors(values, tr, seqs.attention_mask, seqs.document_ids, gamma)
    advantage = gae(delta, defined, gamma, lam)
    for r, row in enumerate(segments(seqs)):
        for _, cols in row:
            assert not defined[r, cols[0]]
            expected = {}
            for j, prev in zip(cols[1:], cols[:-1], strict=True):
                v_star = 0.0 if tr.terminal[r, j] else float(values[r, j])
                expected[j] = float(tr.reward[r, j]) + gamma * v_star - float(values[r, prev])
                assert defined[r, j] and float(delta[r, j]) == pytest.approx(expected[j], rel=1e-5, abs=1e-6)
            for k, j in enumerate(cols[1:]):
                rest = cols[1 + k:]
                a = sum((gamma * lam) ** i * expected[x] for i, x in enumerate(rest))
                assert float(advantage[r, j]) == pytest.approx(a, rel=1e-4, abs=1e-5)
    assert not delta[~defined].any() and not advantage[~defined].any()


def test_gae_with_lambda_one_is_the_return_minus_the_value():
    seqs, rewards = packed_set(7, max_length=64)
    tr = token_rewards(seqs, rewards)
    values = torch.randn(seqs.input_ids.shape)
    delta, defined = td_errors(values, tr, seqs.attention_mask, seqs.document_ids, 1.0)
    advantage = gae(delta, defined, 1.0, 1.0)
    mc, _ = mc_returns(tr, seqs.attention_mask, 1.0)
    for r, row in enumerate(segments(seqs)):
        for doc, cols in row:
            if stream_positions(seqs)[doc][0] == (r, cols[0]) and tr.terminal[r, cols[-1]]:
                j, prev = cols[1], cols[0]  # A[j] = G(s_{j-1}) - V(s_{j-1}) when the document ends in the row
                assert float(advantage[r, j]) == pytest.approx(float(mc[r, prev] - values[r, prev]), rel=1e-4,
                                                               abs=1e-5)


def test_explained_variance():
    target = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mask = torch.ones(4, dtype=torch.bool)
    assert explained_variance(target, target, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full((4,), 2.5), target, mask) == pytest.approx(0.0)
    assert explained_variance(target, torch.ones(4), mask) is None  # targets do not vary: missing, not 0
