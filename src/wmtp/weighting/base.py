"""The protocol every weighting scheme follows."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepBatch:
    """One micro-batch of an optimizer step. input_ids, attention_mask: [B, S]; labels: [B, S, n];
    rows: [B], the sequences' indices in the training set (for per-sequence caches)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    rows: torch.Tensor


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
