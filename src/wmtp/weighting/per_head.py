"""The per-head weight transform every scheme that weighs over the step calls (docs/method.md §4, §5).

Per head h, over that head's valid pairs of the whole step (all micro-batches, all ranks, gathered in the order
rank, micro-batch, row, position, so two ranks compute what one process would, §5):
1. gather the head's values into one vector [N_h];
2. a scheme's rule turns them into weights [N_h]: `exp_weights` for Rho-1 `weighted` (§5.2), the critic (§5.3) and
   gradnorm (§5.4) — standardise, exp(±z/T) shifted by its maximum in float64, `mean1_clip` (§4); a top-fraction
   selection for Rho-1's other modes; `mean1_clip` alone for a hybrid's combined weights (§5.5);
3. the weights' statistics (`WEIGHT_STATS`, named `<prefix>/<stat>_head<h>`) and histogram;
4. this rank's share written back into the micro-batches' [B, S, n] weights, 0 on invalid pairs.
A head without valid pairs (on any rank) gets zeros, no metrics and an empty histogram; its rule is not called.
`PerHeadRecord` is what a scheme keeps of the results: the step's metrics and histograms (TensorBoard's, tagged
`<name>/weights_head<h>`) and the histograms summed over the run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from ..loss import mean1_clip
from ..runtime.distributed import DistInfo, all_gather_concat
from ..runtime.tracking import Histogram

HISTOGRAM_BINS = 40
HISTOGRAM_MAX = 4.0

# rule(head, values [N] of that head, N > 0) -> (weights [N] >= 0, the head's signal metrics by name)
HeadRule = Callable[[int, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]


class PerHeadWeights(NamedTuple):
    """weights: detached float32 [B, S, n] per micro-batch; metrics: `<prefix>/<name>_head<h>`; histograms:
    [n, HISTOGRAM_BINS] counts of each head's weights over the step (all ranks), on the CPU. A tuple, so that
    `weights, metrics, histograms = rho1_weights(...)` unpacks."""

    weights: list[torch.Tensor]
    metrics: dict[str, float]
    histograms: torch.Tensor


def exp_weights(values: torch.Tensor, mean: torch.Tensor | float, std: torch.Tensor | float, *, temperature: float,
                eps: float, w_max: float, sign: float = 1.0, capped: torch.Tensor | None = None) -> torch.Tensor:
    """mean1_clip(exp(sign·z/T), eps, w_max) with z = (values − mean)/std (z = 0 when std = 0), float32 [N].

    values: [N], standardised in their own dtype; sign −1 weighs high values less (gradnorm `direction: down`);
    capped: [N] bool, values whose exp(z/T) is capped at 1, the weight of a value at the mean (Rho-1's
    `min_ce_diff`, §5.2)."""
    z = (values - mean) / std if float(std) > 0 else torch.zeros_like(values)
    log_w = sign * z / temperature  # in log space: exp(z/T) overflows fp32 beyond z/T ≈ 88
    if capped is not None:
        log_w = torch.where(capped, log_w.clamp(max=0.0), log_w)
    # shifted by the maximum (mean1_clip does not see the scale) and in float64, where the others of a dominant
    # value stay positive down to exp(−745)
    raw = torch.exp((log_w - log_w.max()).double())
    return mean1_clip(raw, torch.ones_like(raw, dtype=torch.bool), eps=eps, w_max=w_max)


def normalised_entropy(weights: torch.Tensor) -> float:
    """H(p)/log N of p = weights / Σ weights, [N]: 1 for uniform weights (and for N = 1), lower when peaked."""
    if weights.numel() < 2:
        return 1.0
    p = weights / weights.sum()
    return float(-(p * p.clamp_min(1e-30).log()).sum()) / math.log(weights.numel())


WEIGHT_STATS: dict[str, Callable[[torch.Tensor], float]] = {
    "selected_frac": lambda w: float((w > 0).float().mean()),
    "zero_frac": lambda w: float((w == 0).float().mean()),
    "weight_mean": lambda w: float(w.mean()),
    "weight_std": lambda w: float(w.std(unbiased=False)),
    "weight_max": lambda w: float(w.max()),
    "weight_entropy": normalised_entropy,
}


def per_head_weights(signals: list[torch.Tensor], valid: list[torch.Tensor], rule: HeadRule, info: DistInfo, *,
                     prefix: str, stats: Sequence[str]) -> PerHeadWeights:
    """The transform of the module docstring. signals, valid: [B, S, n] per micro-batch of this rank; `rule` makes
    one head's weights from its values over the step; `stats`: the names of `WEIGHT_STATS` to report per head."""
    unknown = [name for name in stats if name not in WEIGHT_STATS]
    if unknown:
        raise ValueError(f"unknown weight statistic {unknown[0]} (choose from {', '.join(WEIGHT_STATS)})")
    weights = [torch.zeros(v.shape, dtype=torch.float32, device=v.device) for v in valid]
    metrics: dict[str, float] = {}
    histograms = []
    for h in range(valid[0].shape[-1]):
        values, offset, local_count = gather_head(signals, valid, h, info)
        if values.numel() == 0:
            histograms.append(weight_histogram(values))
            continue
        head_w, signal_metrics = rule(h, values)
        metrics.update({f"{prefix}/{name}_head{h}": value for name, value in signal_metrics.items()})
        metrics.update({f"{prefix}/{name}_head{h}": WEIGHT_STATS[name](head_w) for name in stats})
        histograms.append(weight_histogram(head_w))
        scatter_head(weights, valid, h, head_w[offset:offset + local_count])
    return PerHeadWeights(weights, metrics, torch.stack(histograms).cpu())


def gather_head(signals: list[torch.Tensor], valid: list[torch.Tensor], head: int,
                info: DistInfo) -> tuple[torch.Tensor, int, int]:
    """All valid values of one head over the step's micro-batches and all ranks, in step order (rank-major);
    with this rank's offset and count in that vector. signals, valid: [B, S, n] per micro-batch."""
    local = torch.cat([s[..., head][v[..., head]] for s, v in zip(signals, valid, strict=True)])
    gathered, offset = all_gather_concat(local, info)
    return gathered, offset, local.numel()


def scatter_head(weights: list[torch.Tensor], valid: list[torch.Tensor], head: int, values: torch.Tensor) -> None:
    """Write this rank's values of one head (in step order) back into the micro-batches' [B, S, n] weights."""
    start = 0
    for w, v in zip(weights, valid, strict=True):
        k = int(v[..., head].sum())
        w[..., head][v[..., head]] = values[start:start + k]
        start += k


def weight_histogram(head_weights: torch.Tensor) -> torch.Tensor:
    """Counts of one head's weights in HISTOGRAM_BINS bins over [0, HISTOGRAM_MAX] (above: not counted)."""
    if head_weights.numel() == 0:
        return torch.zeros(HISTOGRAM_BINS)
    return torch.histc(head_weights.float(), bins=HISTOGRAM_BINS, min=0.0, max=HISTOGRAM_MAX).cpu()


class PerHeadRecord:
    """What a scheme keeps of the per-head weights it makes: the metrics of the step (with `per_micro_batch`,
    `scoring: in_forward`'s one transform per micro-batch, their mean over the step's micro-batches so far) and the
    weight histograms of the step (summed over its micro-batches) and summed over the run, written as
    `<name>_weight_histogram.json` (what `wmtp report` plots)."""

    def __init__(self, name: str, per_micro_batch: bool = False) -> None:
        self.name, self.per_micro_batch = name, per_micro_batch
        self.metrics: dict[str, float] = {}
        self.histogram: torch.Tensor | None = None  # [n, HISTOGRAM_BINS], over the run
        self.step_histogram: torch.Tensor | None = None  # [n, HISTOGRAM_BINS], over the last step
        self._count = 0  # transforms in `metrics` so far this step

    def new_step(self) -> None:
        """Forget the last step's metrics (per_micro_batch: before the step's first micro-batch)."""
        self.metrics, self._count = {}, 0

    def add(self, metrics: dict[str, float], histograms: torch.Tensor) -> None:
        """One transform's metrics and histograms [n, HISTOGRAM_BINS]. A metric the transform did not measure (a
        head without valid pairs) is not kept from an earlier one."""
        same_step = self.per_micro_batch and self._count > 0
        if self.per_micro_batch:
            count = self._count
            metrics = {k: (self.metrics.get(k, v) * count + v) / (count + 1) for k, v in metrics.items()}
            self._count += 1
        self.metrics = metrics
        self.step_histogram = self.step_histogram + histograms if same_step else histograms
        self.histogram = histograms if self.histogram is None else self.histogram + histograms

    def histograms(self) -> dict[str, Histogram]:
        """The last step's histogram of each head's weights, tagged `<name>/weights_head<h>` (none before a step)."""
        if self.step_histogram is None:
            return {}
        edges = torch.linspace(0.0, HISTOGRAM_MAX, HISTOGRAM_BINS + 1).tolist()
        return {f"{self.name}/weights_head{h}": Histogram(edges, counts)
                for h, counts in enumerate(self.step_histogram.tolist())}

    def artifacts(self) -> dict[str, str]:
        """`<name>_weight_histogram.json`, once a step was recorded."""
        if self.histogram is None:
            return {}
        edges = torch.linspace(0.0, HISTOGRAM_MAX, HISTOGRAM_BINS + 1).tolist()
        return {f"{self.name}_weight_histogram.json": json.dumps({
            "bin_edges": edges, "note": "weights above the last edge are not counted (torch.histc ignores them)",
            "counts_per_head": self.histogram.tolist()})}
