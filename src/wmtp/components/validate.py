"""Head quality on held-out text: per-head cross-entropy, perplexity and top-1 accuracy, overall and by position,
and each depth's teacher-forced acceptance against head 0 (docs/method.md §6). One function serves training
validation, `wmtp eval` and `--dry-run`.

Perplexity is exp of the token-mean CE over all valid pairs of a head (not a mean of per-batch perplexities).
A position bucket groups pairs by the position t of the predicting token (how much context it had); head h at t
predicts x[t+1+h]. A bucket without valid pairs is reported as missing (None). Uniform weights: runs with
different schemes are compared on the same quantity.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import nullcontext

import torch

from ..data.sequences import SequenceSet, labels_for
from ..loss import IGNORE_INDEX
from ..model.mtp import MTPLoss, TrunkStates
from ..runtime.distributed import DistInfo, all_reduce_sum
from .acceptance import acceptance_counts, acceptance_report, greedy_tokens

DEFAULT_EDGES = (0, 16, 64, 256, 1024)


def _stats(ce: float, correct: float, count: float) -> dict:
    if count == 0:
        return {"ce": None, "ppl": None, "acc": None, "pairs": 0}
    mean = ce / count
    return {"ce": mean, "ppl": math.exp(min(mean, 50.0)), "acc": correct / count, "pairs": int(count)}


def validation_rows(n_sequences: int, batch_size: int, max_batches: int | None,
                    info: DistInfo | None) -> Iterator[tuple[torch.Tensor, bool]]:
    """This rank's validation batches over the first `max_batches` batches of `n_sequences` rows: (row indices,
    measured). Rank r takes batches r, r + world, ...; every rank yields the same number, a rank without a batch
    left yields the first rows unmeasured (its forward keeps FSDP2's collectives matched, its result is dropped)."""
    rank, world = (info.rank, info.world_size) if info is not None else (0, 1)
    n_batches = math.ceil(n_sequences / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for i in range(math.ceil(n_batches / world)):
        b = i * world + rank
        first = b * batch_size if b < n_batches else 0
        yield torch.arange(first, min(first + batch_size, n_sequences)), b < n_batches


@torch.no_grad()
def head_quality(model, sequences: SequenceSet, *, n_heads: int | None = None, batch_size: int = 8,
                 mask_prompt: bool = False, chunk_size: int = 256, edges: tuple[int, ...] = DEFAULT_EDGES,
                 device: torch.device | None = None, autocast=None, max_batches: int | None = None,
                 info: DistInfo | None = None, trunk_states: Callable[[torch.Tensor], TrunkStates] | None = None,
                 ) -> dict:
    """{"loss", "heads": [per-head stats], "buckets": [{"positions": [lo, hi), "heads": [...]}, ...], "acceptance":
    `acceptance_report` (no depths with one head), "sequences"} over the first `max_batches` batches of `sequences`.

    The greedy tokens that acceptance compares come from the same forward (its `weights_fn` sees the heads' hidden
    states; the weights it returns are 1, what no weights mean): one more [chunk, V] product per chunk of valid
    pairs, no second trunk pass.

    `model` may be wrapped (DDP/FSDP2; give `n_heads` then). With `info` of several ranks, rank r takes batches
    r, r + world, ... and the sums are all-reduced; every rank runs the same number of forwards (a rank without a
    batch left runs one whose labels are all ignored), which FSDP2's collectives need. `trunk_states`: the cached
    trunk states of a batch's rows, read instead of running the trunk (a run with a trunk cache)."""
    n = n_heads if n_heads is not None else model.n_heads
    device = device or next(model.parameters()).device
    length = sequences.input_ids.shape[1]
    bounds = [e for e in edges if e < length] + [length]
    bucket_of = torch.bucketize(torch.arange(length), torch.tensor(bounds[1:]), right=True).to(device)  # [S]
    n_buckets = len(bounds) - 1
    sums = torch.zeros(3, n_buckets, n, dtype=torch.float64, device=device)  # ce, correct, count
    accept = torch.zeros(2, n - 1, dtype=torch.float64, device=device)  # eligible, accepted per depth
    model.eval()
    n_batches = math.ceil(len(sequences) / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for index, measured in validation_rows(len(sequences), batch_size, max_batches, info):
        batch = {k: v.to(device) for k, v in sequences.select(index).items()}
        labels = labels_for(batch, n, mask_prompt)
        if not measured:
            labels = torch.full_like(labels, IGNORE_INDEX)
        greedy: list[torch.Tensor] = []
        keep = _keep_greedy(labels, chunk_size, greedy) if n > 1 else None  # one head: no depth to accept
        with autocast or nullcontext():
            out = model(batch["input_ids"], batch["attention_mask"],
                        MTPLoss(labels, chunk_size=chunk_size, weights_fn=keep),
                        **({} if trunk_states is None else {"trunk": trunk_states(index)}))
        if greedy:
            accept += acceptance_counts(greedy[0], labels != IGNORE_INDEX)
        valid = (labels != IGNORE_INDEX).double()  # [B, S, n]
        index_b = bucket_of.view(1, -1, 1).expand_as(valid)
        for row, values in enumerate((out.ce.double() * valid, out.correct.double() * valid, valid)):
            sums[row].view(-1).index_add_(0, (index_b * n + torch.arange(n, device=device)).reshape(-1),
                                          values.reshape(-1))
    if info is not None:
        all_reduce_sum(sums, info)
        if n > 1:
            all_reduce_sum(accept, info)
    total = sums.sum(dim=1)  # [3, n]
    heads = [{"head": h, **_stats(*(float(total[r, h]) for r in range(3)))} for h in range(n)]
    buckets = [{"positions": [bounds[i], bounds[i + 1]],
                "heads": [{"head": h, **_stats(*(float(sums[r, i, h]) for r in range(3)))} for h in range(n)]}
               for i in range(n_buckets)]
    pairs = float(total[2].sum())
    return {"loss": float(total[0].sum()) / pairs if pairs else None, "heads": heads, "buckets": buckets,
            "acceptance": acceptance_report(accept), "sequences": min(len(sequences), n_batches * batch_size)}


def _keep_greedy(labels: torch.Tensor, chunk_size: int, into: list[torch.Tensor]):
    """An `MTPLoss.weights_fn` that appends every head's greedy tokens [B, S, n] to `into` and weighs every pair 1."""

    def weights_fn(hidden: list[torch.Tensor], model) -> torch.Tensor:
        into.append(greedy_tokens(hidden, model.unembedding.weight, labels, bias=model.unembedding.bias,
                                  chunk_size=chunk_size))
        return torch.ones(labels.shape, dtype=torch.float32, device=labels.device)

    return weights_fn


def quality_metrics(report: dict, prefix: str = "val") -> dict[str, float]:
    """`<prefix>/loss` (mean CE over all valid pairs of all heads), per head `<prefix>/ce_head{h}`, `ppl_head{h}`,
    `acc_head{h}`, per draft head h = 1…n-1 `<prefix>/acceptance_head{h}` (its depth's teacher-forced acceptance)
    and `<prefix>/tokens_per_forward` of a `head_quality` report. What was not measured (a head without valid
    pairs, a depth without an eligible position) is absent, never a number."""
    metrics = {} if report["loss"] is None else {f"{prefix}/loss": report["loss"]}
    for head in report["heads"]:
        if head["ce"] is None:
            continue
        h = head["head"]
        metrics.update({f"{prefix}/ce_head{h}": head["ce"], f"{prefix}/ppl_head{h}": head["ppl"],
                        f"{prefix}/acc_head{h}": head["acc"]})
    metrics.update(acceptance_metrics(report.get("acceptance"), prefix))
    return metrics


def acceptance_metrics(acceptance: dict | None, prefix: str) -> dict[str, float]:
    """`<prefix>/acceptance_head{k}` per measured depth and `<prefix>/tokens_per_forward` of an
    `acceptance_report` (None: nothing)."""
    if acceptance is None:
        return {}
    metrics = {f"{prefix}/acceptance_head{d['depth']}": d["rate"] for d in acceptance["depths"]
               if d["rate"] is not None}
    if acceptance["tokens_per_forward"] is not None:
        metrics[f"{prefix}/tokens_per_forward"] = acceptance["tokens_per_forward"]
    return metrics


def quality_metric_names(n_heads: int, prefix: str = "val") -> list[str]:
    """The names `quality_metrics` reports (what early stopping may monitor, with the scheme's own)."""
    heads = [f"{prefix}/{kind}_head{h}" for h in range(n_heads) for kind in ("ce", "ppl", "acc")]
    depths = [f"{prefix}/acceptance_head{k}" for k in range(1, n_heads)]
    return [f"{prefix}/loss", *heads, *depths] + ([f"{prefix}/tokens_per_forward"] if n_heads > 1 else [])
