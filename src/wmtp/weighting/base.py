"""The protocol every weighting scheme follows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


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
