"""Uniform weights (baseline-mtp): w ≡ 1, docs/method.md §5.1. With λ_h = 1 this is Meta's MTP (Gloeckle et al.,
2024); with `mtp.n_heads: 1` it is ordinary next-token training."""

from __future__ import annotations

import torch

from ..config import Strict
from .base import SchemeContext, SchemePlugin, StepBatch, WeightingScheme


class UniformSettings(Strict):
    """baseline-mtp owns no recipe section."""


class UniformWeighting(WeightingScheme):
    def step_weights(self, batches: list[StepBatch]) -> list[torch.Tensor | None]:
        return [None for _ in batches]


def build(settings: UniformSettings, context: SchemeContext) -> UniformWeighting:
    return UniformWeighting()


PLUGIN = SchemePlugin(settings=UniformSettings, build=build)
