"""The critic's math on token sequences (docs/method.md §5.3): rewards placed at documents' last tokens,
value targets (Monte-Carlo, TD(λ)), TD errors and GAE, all per packed row and never across documents.

Conventions. A document is an episode. State s_t is the prefix x_{≤t}; V[t] = V(s_t). Generating x_j earns
r[j], which is the document's reward at its last token T and 0 elsewhere. After T nothing follows, so
V(s_T) ≡ 0: a terminal position is never a value-loss target. A row's last position whose document continues
in the next row is *truncated*. Its successor is not in the batch, so its TD(λ) target bootstraps from its own
value, and it is left out of the value loss (Monte-Carlo targets count steps across rows and keep it).

Shapes: every tensor here is [B, S] for a batch of rows (or [N, S] for a whole set).
- valid: the attention mask. document_ids: the packed document of each token.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from ...data.sequences import SequenceSet


@dataclass
class TokenRewards:
    """Per row: the reward of each position's document, the reward earned at each position (non-zero only at
    a document's last token), terminal and truncated flags, and steps to the document's end in the packed
    stream (0 at the last token, -1 on padding)."""

    doc_reward: torch.Tensor
    reward: torch.Tensor
    terminal: torch.Tensor
    truncated: torch.Tensor
    steps_to_end: torch.Tensor

    def select(self, rows: torch.Tensor, device: torch.device) -> TokenRewards:
        return TokenRewards(*(getattr(self, f.name)[rows.cpu()].to(device) for f in fields(self)))


def same_document_next(valid: torch.Tensor, document_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] bool: position t+1 is real and in t's document (False at the last column)."""
    out = torch.zeros(valid.shape, dtype=torch.bool, device=valid.device)
    out[:, :-1] = valid[:, :-1].bool() & valid[:, 1:].bool() & (document_ids[:, :-1] == document_ids[:, 1:])
    return out


def token_rewards(sequences: SequenceSet, doc_rewards: torch.Tensor) -> TokenRewards:
    """Place each document's reward at its last token. doc_rewards: [D], indexed by the set's document ids.

    Rows are consecutive slices of one packed stream (or one truncated document each), so a document's last
    token is its last occurrence in row-major order over the real tokens."""
    valid = sequences.attention_mask.bool()
    docs = sequences.document_ids
    flat_docs = docs[valid]  # the stream, row-major
    position = torch.arange(flat_docs.numel())
    last = torch.full((int(docs.max()) + 1,), -1, dtype=torch.long)
    last.scatter_reduce_(0, flat_docs, position, reduce="amax")
    steps = torch.full(docs.shape, -1, dtype=torch.long)
    steps[valid] = last[flat_docs] - position
    terminal = steps == 0
    doc_reward = torch.zeros(docs.shape, dtype=torch.float32)
    doc_reward[valid] = doc_rewards.float()[flat_docs]
    reward = torch.where(terminal, doc_reward, torch.zeros(()))
    truncated = valid & ~terminal & ~same_document_next(valid, docs)
    return TokenRewards(doc_reward, reward, terminal, truncated, steps)


def mc_returns(tr: TokenRewards, valid: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte-Carlo value targets G[t] = γ^(T−t−1)·r_T at non-terminal real positions, and that mask."""
    mask = valid.bool() & ~tr.terminal
    exponent = (tr.steps_to_end - 1).clamp_min(0).float()
    target = tr.doc_reward * torch.pow(torch.full_like(exponent, gamma), exponent)
    return torch.where(mask, target, torch.zeros((), device=target.device)), mask


def td_lambda_targets(values: torch.Tensor, tr: TokenRewards, valid: torch.Tensor, document_ids: torch.Tensor,
                      gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """TD(λ) returns bootstrapped from `values` (detached), computed backwards within each document of a row:
    G[t] = r[t+1] + γ((1−λ)·V*(t+1) + λ·G[t+1]), with V* = 0 at a terminal, G = V at a truncated position.
    Returns (targets, mask): the mask leaves out padding, terminals and truncated positions."""
    values = values.detach().float()
    next_same = same_document_next(valid, document_ids)
    v_star = torch.where(tr.terminal, torch.zeros((), device=values.device), values)
    targets = torch.zeros_like(values)
    g_next = torch.zeros(values.shape[0], device=values.device)
    for t in range(values.shape[1] - 1, -1, -1):
        if t + 1 < values.shape[1]:
            step = tr.reward[:, t + 1] + gamma * ((1 - lam) * v_star[:, t + 1] + lam * g_next)
        else:
            step = torch.zeros_like(g_next)
        g = torch.where(next_same[:, t], step, torch.where(tr.truncated[:, t], values[:, t], torch.zeros_like(step)))
        targets[:, t] = g
        g_next = g
    mask = valid.bool() & ~tr.terminal & ~tr.truncated
    return torch.where(mask, targets, torch.zeros((), device=values.device)), mask


def td_errors(values: torch.Tensor, tr: TokenRewards, valid: torch.Tensor, document_ids: torch.Tensor,
              gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """δ[j] = r[j] + γ·V*(j) − V(j−1) for every target token j whose predecessor is in its document and row
    (V* = 0 at a terminal). Returns (δ, defined), both [B, S]; δ is 0 where undefined (j = 0, padding, a
    document's first token)."""
    values = values.detach().float()
    defined = torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    defined[:, 1:] = same_document_next(valid, document_ids)[:, :-1]
    v_star = torch.where(tr.terminal, torch.zeros((), device=values.device), values)
    delta = torch.zeros_like(values)
    delta[:, 1:] = tr.reward[:, 1:] + gamma * v_star[:, 1:] - values[:, :-1]
    return torch.where(defined, delta, torch.zeros((), device=values.device)), defined


def gae(delta: torch.Tensor, defined: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """GAE(λ) per target token: A[j] = δ[j] + γλ·A[j+1] while j+1 is defined (same document, same row)."""
    out = torch.zeros_like(delta)
    a_next = torch.zeros(delta.shape[0], device=delta.device)
    for j in range(delta.shape[1] - 1, -1, -1):
        carry = defined[:, j + 1] if j + 1 < delta.shape[1] else torch.zeros_like(defined[:, j])
        a = delta[:, j] + gamma * lam * torch.where(carry, a_next, torch.zeros_like(a_next))
        out[:, j] = torch.where(defined[:, j], a, torch.zeros_like(a))
        a_next = out[:, j]
    return out


def explained_variance(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float | None:
    """1 − Var(target − prediction) / Var(target) over the mask (None when the targets do not vary)."""
    t, p = target[mask].double(), prediction[mask].double()
    if t.numel() < 2 or float(t.var()) == 0.0:
        return None
    return float(1.0 - (t - p).var() / t.var())
