"""Teacher-forced acceptance per depth (docs/method.md §6): how often each draft head's greedy token equals the
token head 0 itself would choose there, measured on held-out text in the forward that validation already runs.

Depth k = 1…n-1 at position t drafts head k's argmax, which predicts x[t+k+1]; head 0 at position t+k predicts the
same token, teacher-forced on the data prefix x[≤ t+k]. The draft is *accepted* when the two argmaxes agree. A
depth counts at t only when every depth before it was accepted at t (speculative decoding discards a draft after
a rejected one) and when both pairs, (t, k) and (t+k, 0), are valid labels (§1: the same document, no padding,
inside the row). a_k = accepted_k / eligible_k, and the expected tokens per forward of greedy self-speculative
decoding with these rates is 1 + Σ_k Π_{j≤k} a_j.

`head_quality` (components/validate.py) is the one caller: it computes the greedy tokens in its own forward
(`greedy_tokens` from the heads' hidden states, chunked like the fused CE) and sums `acceptance_counts` over
micro-batches and ranks; validation, `wmtp eval` and `--dry-run` all read it from there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..loss import valid_pair_rows


@torch.no_grad()
def greedy_tokens(head_hidden: list[torch.Tensor], unembedding: torch.Tensor, labels: torch.Tensor, *,
                  bias: torch.Tensor | None = None, chunk_size: int = 256) -> torch.Tensor:
    """Each head's argmax token on its valid pairs, without materialising [B, S, n, V].

    head_hidden: n tensors [B, S, D] (after the shared final norm, what the unembedding reads); unembedding: [V, D];
    labels: [B, S, n] (only which pairs are valid is read). Rows are taken `chunk_size` at a time, the matmul in the
    hidden states' dtype and the max in fp32 with autocast off, as `fused_linear_mtp_ce` takes its argmax, so a
    token here is the one its `correct` compares. Returns int64 [B, S, n], -1 on ignored pairs."""
    rows, flat_index = valid_pair_rows(head_hidden, labels, chunk_size)
    weight = unembedding.to(rows.dtype)
    b = None if bias is None else bias.to(rows.dtype)
    tokens = torch.empty(rows.shape[0], dtype=torch.long, device=rows.device)
    with torch.autocast(device_type=rows.device.type, enabled=False):
        for start in range(0, rows.shape[0], chunk_size):
            end = min(start + chunk_size, rows.shape[0])
            tokens[start:end] = F.linear(rows[start:end], weight, b).float().max(dim=-1).indices
    out = torch.full(labels.shape, -1, dtype=torch.long, device=labels.device)
    out.view(-1)[flat_index] = tokens
    return out


def acceptance_counts(greedy: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(eligible, accepted) per depth k = 1…n-1, float64 [2, n-1], summed over the batch.

    greedy: [B, S, n] each head's argmax token (read only where `valid`); valid: bool [B, S, n], the valid pairs
    (labels != -100). Depth k at t is eligible when depths 1…k-1 were accepted at t and (t, k) and (t+k, 0) are
    valid; it is accepted when, besides, greedy[t, k] == greedy[t+k, 0]. Counts, not rates, so that micro-batches
    and ranks add up."""
    batch, seq, n = greedy.shape
    counts = torch.zeros(2, max(n - 1, 0), dtype=torch.float64, device=greedy.device)
    chain = torch.ones(batch, seq, dtype=torch.bool, device=greedy.device)  # depths 1…k-1 accepted at t
    for k in range(1, n):
        eligible = torch.zeros_like(chain)
        agree = torch.zeros_like(chain)
        if k < seq:  # position t+k exists for t < S-k only
            eligible[:, : seq - k] = chain[:, : seq - k] & valid[:, : seq - k, k] & valid[:, k:, 0]
            agree[:, : seq - k] = greedy[:, : seq - k, k] == greedy[:, k:, 0]
        chain = eligible & agree
        counts[0, k - 1] = eligible.sum()
        counts[1, k - 1] = chain.sum()
    return counts


def tokens_per_forward(rates: list[float | None]) -> float | None:
    """1 + Σ_k Π_{j≤k} a_j over the depths' rates a_1…a_{n-1}; None (not measured) when no depth exists or a rate
    the sum needs is missing. A depth after one whose product is already 0 adds 0 whatever its own rate: a draft
    that is never reached never counts."""
    if not rates:
        return None
    total, reach = 1.0, 1.0
    for rate in rates:
        if reach == 0.0:
            break
        if rate is None:
            return None
        reach *= rate
        total += reach
    return total


def acceptance_report(counts: torch.Tensor) -> dict:
    """{"depths": [{"depth", "eligible", "accepted", "rate"}, ...], "tokens_per_forward"} of summed
    `acceptance_counts` [2, n-1]; a depth without an eligible position has rate None, never 0."""
    depths = []
    for k in range(counts.shape[1]):
        eligible, accepted = int(counts[0, k]), int(counts[1, k])
        depths.append({"depth": k + 1, "eligible": eligible, "accepted": accepted,
                       "rate": accepted / eligible if eligible else None})
    return {"depths": depths, "tokens_per_forward": tokens_per_forward([d["rate"] for d in depths])}
