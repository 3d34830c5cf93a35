"""Uniform weights (baseline-mtp): w ≡ 1. With λ_h = 1 this is Meta's MTP (Gloeckle et al., 2024)."""

from __future__ import annotations

import torch

from .base import StepBatch, WeightingScheme


class UniformWeighting(WeightingScheme):
    name = "uniform"

    def step_weights(self, batches: list[StepBatch]) -> list[torch.Tensor | None]:
        return [None for _ in batches]
