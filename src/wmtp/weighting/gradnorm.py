"""Gradient-norm weighting (docs/method.md §5.4): a pair weighs by how hard it pulls on the model.

Signal. For softmax cross-entropy ∂ℓ/∂logits = p − e_y, so the norm of a pair's gradient at the logits has the
closed form g² = ‖p − e_y‖² = Σ_i p_i² − 2·p_y + 1 (p the softmax of the head's logits, y the target): 0 for a
confidently right prediction, up to 2 for a confidently wrong one. It comes from the logits alone, without any
backward, chunked like the fused CE (`loss.fused_linear_grad_norm_sq`, fp32 softmax).

When. Per optimizer step, one no-grad pass of the current model over every micro-batch of the step, before the
step's first backward (as Rho-1 scores its own CE): the weights are those of the current parameters. The
previous step's statistics cannot stand in for it: the trainer's fused forward takes each chunk's gradient during
the forward, with the weights already inside its coefficients (docs/method.md §3), so a pair's weight must be
known before that pair's forward, and the previous step's pass saw other pairs. What can carry over from earlier
steps is the per-head mean and std used for standardising, which `smoothing: ema` does. The pass costs one forward
without gradient: trunk, heads and the chunked logits of the valid pairs, with no gradient matmuls.

Weights, per head over the valid pairs of the whole step (all micro-batches, all ranks): s = g (`signal: norm`)
or g² (`squared`); z = (s − μ_h)/σ_h, with μ_h, σ_h the step's mean and population std, or their exponential
moving averages over steps (`smoothing: ema`, `ema_decay`); w = mean1_clip(exp(±z/T), eps, w_max), with + for
`direction: up` (hard pairs weigh more) and − for `down` (hard pairs weigh less: a filter for noisy targets).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field, model_validator

from ..config import Strict
from ..loss import IGNORE_INDEX, fused_linear_grad_norm_sq
from ..runtime.distributed import DistInfo
from .base import (
    PairSignalWeighting,
    SchemeContext,
    SchemePlugin,
    StepBatch,
    check_in_forward,
)
from .per_head import PerHeadRecord, exp_weights, per_head_weights


class GradNormSettings(Strict):
    """Recipe section `gradnorm`: weights from each pair's gradient norm at the logits, per head, over the step."""

    signal: Literal["norm", "squared"] = Field(
        "norm", description="norm: g = ‖p − e_y‖, the gradient's own size (importance sampling's optimal "
        "proposal is proportional to it); squared: g², which spreads the hardest pairs further apart")
    smoothing: Literal["none", "ema"] = Field(
        "none", description="none: standardise with the step's per-head mean and std; ema: with their "
        "exponential moving averages over steps")
    ema_decay: float = Field(0.9, ge=0, lt=1, description="ema: μ̄ ← d·μ̄ + (1 − d)·μ_step, σ̄ likewise")
    temperature: float = Field(1.0, gt=0, description="w = exp(±z/T), z the per-head standardised signal")
    eps: float = Field(0.05, ge=0, le=1, description="mean1_clip floor: no weight lies below it")
    w_max: float = Field(3.0, ge=1, description="mean1_clip ceiling: no weight lies above it")
    scoring: Literal["separate_pass", "in_forward"] = Field(
        "separate_pass", description="separate_pass: a no-grad forward over the whole step first, statistics over "
        "the step; in_forward: the signal from the training forward's own hidden states, statistics per "
        "micro-batch (one trunk forward; with ema, the averages move per micro-batch; needs loss.reduction "
        "token_mean)")
    direction: Literal["up", "down"] = Field(
        "up", description="up: exp(z/T), hard pairs weigh more; down: exp(−z/T), hard pairs weigh less (a noise "
        "filter)")

    @model_validator(mode="after")
    def _keys_of_smoothing(self) -> GradNormSettings:
        if "ema_decay" in self.model_fields_set and self.smoothing != "ema":
            raise ValueError("`ema_decay` only applies to smoothing: ema")
        return self


class GradNormRecipe(Strict):
    """The recipe section algorithm gradnorm owns (all defaults when absent)."""

    gradnorm: GradNormSettings = Field(default_factory=GradNormSettings)


def gradnorm_weights(signals: list[torch.Tensor], labels: list[torch.Tensor], *, temperature: float, eps: float,
                     w_max: float, direction: str, info: DistInfo, ema_decay: float | None = None,
                     smoothed: torch.Tensor | None = None,
                     ) -> tuple[list[torch.Tensor], dict[str, float], torch.Tensor, torch.Tensor]:
    """Detached weights [B, S, n] per micro-batch from the per-pair signal [B, S, n] of the step's micro-batches.

    Per head over the step's valid pairs (all ranks): z = (s − μ)/σ (z = 0 when σ = 0), w = mean1_clip(exp(±z/T)).
    μ, σ are the step's mean and population std; with `ema_decay` d they are d·previous + (1 − d)·step, the
    previous being `smoothed` [n, 2] (μ, σ per head, NaN for a head not seen yet). Returns the weights, per-head
    metrics, weight histograms [n, HISTOGRAM_BINS] and the (μ, σ) used [n, 2] float64 on the CPU.
    """
    n_heads = labels[0].shape[-1]
    used = torch.full((n_heads, 2), math.nan, dtype=torch.float64) if smoothed is None else smoothed.clone()

    def rule(head: int, values: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        values = values.double()
        step = torch.tensor([float(values.mean()), float(values.std(unbiased=False))], dtype=torch.float64)
        previous = used[head]
        used[head] = step if ema_decay is None or bool(previous.isnan().any()) else \
            ema_decay * previous + (1.0 - ema_decay) * step
        mean, std = float(used[head, 0]), float(used[head, 1])
        signal = {"signal_mean": float(step[0]), "signal_std": float(step[1])}
        if ema_decay is not None:
            signal.update({"ema_mean": mean, "ema_std": std})
        return exp_weights(values, mean, std, temperature=temperature, eps=eps, w_max=w_max,
                           sign=1.0 if direction == "up" else -1.0), signal

    result = per_head_weights(signals, [lab != IGNORE_INDEX for lab in labels], rule, info, prefix="gradnorm",
                              stats=("weight_mean", "weight_std", "weight_max"))
    return result.weights, result.metrics, result.histograms, used


class GradNormWeighting(PairSignalWeighting):
    """Per step: each pair's ‖p − e_y‖² from a no-grad pass of the current model, then per-head weights over the
    whole step. With `smoothing: ema` the per-head (μ, σ) carry over steps and are checkpointed."""

    def __init__(self, settings: GradNormSettings, grad_norm_sq: Callable[[StepBatch], torch.Tensor],
                 info: DistInfo, chunk_size: int = 256) -> None:
        self.settings = settings
        self.scoring = settings.scoring
        self.chunk_size = chunk_size
        self.grad_norm_sq = grad_norm_sq
        self.info = info
        self.smoothed: torch.Tensor | None = None  # [n, 2] (μ, σ) per head, with smoothing: ema
        self.record = PerHeadRecord("gradnorm", per_micro_batch=settings.scoring == "in_forward")

    def signal(self, batch: StepBatch) -> torch.Tensor:
        return self.grad_norm_sq(batch)

    def signal_in_forward(self, hidden: list[torch.Tensor], model, batch: StepBatch) -> torch.Tensor:
        return fused_linear_grad_norm_sq(hidden, model.unembedding.weight, batch.labels, bias=model.unembedding.bias,
                                         chunk_size=self.chunk_size)

    def weigh(self, squared: list[torch.Tensor], labels: list[torch.Tensor]) -> list[torch.Tensor]:
        s = self.settings
        signals = squared if s.signal == "squared" else [g.sqrt() for g in squared]
        ema_decay = s.ema_decay if s.smoothing == "ema" else None
        weights, metrics, histogram, used = gradnorm_weights(
            signals, labels, temperature=s.temperature, eps=s.eps, w_max=s.w_max,
            direction=s.direction, info=self.info, ema_decay=ema_decay, smoothed=self.smoothed)
        if ema_decay is not None:
            self.smoothed = used
        self.record.add(metrics, histogram)
        return weights

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        if self.smoothed is None:
            return {}, {}
        return {"ema": self.smoothed.clone()}, {"smoothing": "ema"}

    def load_state(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        self.smoothed = tensors["ema"].to(torch.float64)


def build(settings: GradNormRecipe, context: SchemeContext) -> GradNormWeighting:
    """The signal comes from a no-grad pass of the stepped (wrapped) model, so DDP and FSDP2 gather the
    parameters as in training."""
    from ..model.mtp import GradNormScores  # here: the scheme's settings load without transformers

    chunk_size = context.plan.chunk_size

    @torch.no_grad()
    def grad_norm_sq(batch: StepBatch) -> torch.Tensor:
        with context.autocast:
            return context.wrapped(batch.input_ids, batch.attention_mask, GradNormScores(batch.labels, chunk_size),
                                   trunk=context.trunk_states(batch)).grad_norm_sq

    check_in_forward("gradnorm", settings.gradnorm.scoring, context)
    return GradNormWeighting(settings.gradnorm, grad_norm_sq, context.info, chunk_size)


PLUGIN = SchemePlugin(settings=GradNormRecipe, build=build)
