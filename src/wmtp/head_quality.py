"""Head quality on held-out text: per-head cross-entropy, perplexity and top-1 accuracy, overall and by position.

Perplexity is exp of the token-mean CE over all valid pairs of a head (not a mean of per-batch perplexities).
A position bucket groups pairs by the position t of the predicting token (how much context it had); head h at t
predicts x[t+1+h]. A bucket without valid pairs is reported as missing (None).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from ..data import SequenceSet
from ..loss import IGNORE_INDEX, mtp_labels

DEFAULT_EDGES = (0, 16, 64, 256, 1024)


def _stats(ce: float, correct: float, count: float) -> dict:
    if count == 0:
        return {"ce": None, "ppl": None, "acc": None, "pairs": 0}
    mean = ce / count
    return {"ce": mean, "ppl": math.exp(min(mean, 50.0)), "acc": correct / count, "pairs": int(count)}


@torch.no_grad()
def head_quality(model, sequences: SequenceSet, *, batch_size: int = 8, mask_prompt: bool = False,
                 chunk_size: int = 256, edges: tuple[int, ...] = DEFAULT_EDGES, device: torch.device | None = None,
                 autocast=None, max_batches: int | None = None) -> dict:
    """{"heads": [per-head stats], "buckets": [{"positions": [lo, hi), "heads": [...]}, ...]} over `sequences`."""
    device = device or next(model.parameters()).device
    n = model.n_heads
    length = sequences.input_ids.shape[1]
    bounds = [e for e in edges if e < length] + [length]
    bucket_of = torch.bucketize(torch.arange(length), torch.tensor(bounds[1:]), right=True).to(device)  # [S]
    n_buckets = len(bounds) - 1
    sums = torch.zeros(3, n_buckets, n, dtype=torch.float64, device=device)  # ce, correct, count
    model.eval()
    n_batches = math.ceil(len(sequences) / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        index = torch.arange(b * batch_size, min((b + 1) * batch_size, len(sequences)))
        batch = {k: v.to(device) for k, v in sequences.select(index).items()}
        labels = mtp_labels(batch["input_ids"], n, attention_mask=batch["attention_mask"],
                            document_ids=batch["document_ids"],
                            prompt_mask=batch["prompt_mask"] if mask_prompt else None)
        with autocast or nullcontext():
            out = model(batch["input_ids"], batch["attention_mask"], labels=labels, chunk_size=chunk_size)
        valid = (labels != IGNORE_INDEX).double()  # [B, S, n]
        index_b = bucket_of.view(1, -1, 1).expand_as(valid)
        for row, values in enumerate((out.ce.double() * valid, out.correct.double() * valid, valid)):
            sums[row].view(-1).index_add_(0, (index_b * n + torch.arange(n, device=device)).reshape(-1),
                                          values.reshape(-1))
    total = sums.sum(dim=1)  # [3, n]
    heads = [{"head": h, **_stats(*(float(total[r, h]) for r in range(3)))} for h in range(n)]
    buckets = [{"positions": [bounds[i], bounds[i + 1]],
                "heads": [{"head": h, **_stats(*(float(sums[r, i, h]) for r in range(3)))} for h in range(n)]}
               for i in range(n_buckets)]
    return {"heads": heads, "buckets": buckets, "sequences": min(len(sequences), n_batches * batch_size)}
