"""The protocol every weighting scheme follows."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..distributed import DistInfo, all_gather_concat

HISTOGRAM_BINS = 40
HISTOGRAM_MAX = 4.0


@dataclass
class StepBatch:
    """One micro-batch of an optimizer step. input_ids, attention_mask, document_ids: [B, S]; labels: [B, S, n];
    rows: [B], the sequences' indices in the training set (for per-sequence caches)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    rows: torch.Tensor
    document_ids: torch.Tensor | None = None


class WeightingScheme:
    """Base class: `step_weights` returns one detached [B, S, n] tensor (or None = uniform) per micro-batch."""

    name = "base"
    allow_negative = False  # a scheme that produces negative weights must say so (REFERENCE.md §3)

    def step_weights(self, batches: list[StepBatch]) -> list[torch.Tensor | None]:
        raise NotImplementedError

    def metrics(self) -> dict[str, float]:
        """Scheme-specific metrics of the last step (selected fraction, excess-loss statistics, ...)."""
        return {}

    def artifacts(self) -> dict[str, str]:
        """Files (name -> text) the trainer writes to the run directory and logs at the end of the run."""
        return {}

    # Hooks for schemes with trainable parts of their own (the critic's value head); no-ops here.
    def before_training(self, trainer) -> None:
        """Called once before the first step (after a resume too): e.g. a pre-training stage."""

    def auxiliary_loss(self, index: int, batch: StepBatch, out) -> torch.Tensor | None:
        """An extra loss for micro-batch `index` of the step, added to the weighted MTP loss before backward."""
        return None

    def after_backward(self, grad_clip: float | None) -> None:
        """Called after the model's optimizer step: step the scheme's own optimizer."""

    def evaluate(self, val_set, batch_size: int, max_batches: int | None = None) -> dict[str, float]:
        """Scheme-specific validation metrics (val/...)."""
        return {}

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors and JSON-able state saved with every checkpoint."""
        return {}, {}

    def load_state(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        """Restore what `state` returned."""

    def finish(self, directory: Path) -> None:
        """Write the scheme's own files next to the final model."""


# ------------------------------------------------------------------- per-head weights over a whole step
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


def histogram_artifact(name: str, histogram: torch.Tensor | None) -> dict[str, str]:
    """`<name>_weight_histogram.json` (what `wmtp report` plots) from per-head counts summed over a run."""
    if histogram is None:
        return {}
    edges = torch.linspace(0.0, HISTOGRAM_MAX, HISTOGRAM_BINS + 1).tolist()
    return {f"{name}_weight_histogram.json": json.dumps({
        "bin_edges": edges, "note": "weights above the last edge are not counted (torch.histc ignores them)",
        "counts_per_head": histogram.tolist()})}
