"""Rho-1 weighting (Lin et al., 2024, "Not All Tokens Are What You Need"), docs/method.md §5.2.

A frozen reference model R scores every target token once: ref[j] = −log p_R(x_j | x_<j). The excess loss of
a pair is signed, e[t, h] = ℓ[t, h] − ref[t+1+h] (high: the reference knows the token, the model does not yet).
The reference sees h more tokens of context than head h, so e grows with h for structural reasons: every
statistic is taken per head, over the valid pairs of the whole optimizer step (all micro-batches, all ranks);
with `scoring: in_forward`, over those of one micro-batch index on all ranks (statistics, cut and clip alike).

Modes:
- `weighted`: z = per-head standardised e, w = exp(z / T), then `mean1_clip(eps, w_max)`.
- `token_skip`: drop the bottom `skip_fraction` of valid pairs per head, keep ⌈(1 − p)·N⌉ (weight 1, others 0).
- `topk`: keep the top ⌈k·N⌉ valid pairs per head (the paper's 60% at 1B, 70% at 7B).
Tie rule for the selection modes: each head is ranked on its own, by e, descending; equal values keep the order
of that head's valid pairs in the step (rank, then micro-batch, then row, then position), so exactly the stated
number is kept.
`min_ce_diff`: pairs with e below it are never selected. In `weighted` mode they are capped, not excluded: their
raw exp(z/T) is capped at 1 (that of a pair of average excess) before `mean1_clip`, so they weigh at most what a
pair of average excess weighs, which exceeds 1 when most pairs are below it (≈ 1.28 with 95% below, normal e).
`train_head0_fully`: head 0 keeps weight 1 on every valid pair; only heads 1… are re-weighted.

The reference runs online (frozen, in eval mode, its CE computed in chunks from its hidden states) or is read
from the cache `wmtp score-reference` writes (config `reference_cache`, checked by fingerprint).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from ...config import ConfigError, Recipe, Strict
from ...data.sequences import SequenceSet
from ...loss import IGNORE_INDEX, fused_linear_mtp_ce, per_target_to_heads
from ...runtime.distributed import DistInfo
from .. import scheme_config
from ..base import (
    PairSignalWeighting,
    SchemeContext,
    SchemePlugin,
    StepBatch,
    check_in_forward,
)
from ..per_head import PerHeadRecord, PerHeadWeights, exp_weights, per_head_weights
from ..reference import (
    load_reference,
    score_reference_batch,
)
from .settings import ReferenceSource, Rho1Config


class Rho1Settings(Strict):
    """Recipe section `rho1`: weights from the signed excess loss ℓ − ref, per head, over the whole step (over each
    micro-batch with `scoring: in_forward`)."""

    mode: Literal["weighted", "token_skip", "topk"] = Field(
        "weighted", description="weighted: w = exp(z/T) of the standardised excess loss, then mean1_clip; "
        "token_skip: drop the bottom skip_fraction of pairs per head; topk: keep the top k per head")
    temperature: float = Field(0.7, gt=0, description="weighted: w = exp(z/T) (the seed's 0.7)")
    eps: float = Field(0.05, ge=0, le=1, description="weighted: mean1_clip floor, no weight lies below it (the "
                       "seed's 0.05)")
    w_max: float = Field(3.0, ge=1, description="weighted: mean1_clip ceiling, no weight lies above it (the seed's "
                         "3.0)")
    skip_fraction: float = Field(0.3, ge=0, lt=1, description="token_skip: drop this bottom fraction per head")
    keep_fraction: float = Field(0.6, gt=0, le=1, description="topk: keep this top fraction per head (paper: 0.6 at "
                                 "1B, 0.7 at 7B)")
    min_ce_diff: float | None = Field(
        None, description="token_skip/topk: pairs with excess below it are never selected; weighted: their "
        "exp(z/T) is capped at 1 before mean1_clip, so they weigh at most what a pair of average excess weighs, "
        "which is above 1 when most pairs are below it (docs/method.md §5.2)")
    train_head0_fully: bool = Field(False, description="head 0 keeps weight 1 on every valid pair")
    scoring: Literal["separate_pass", "in_forward"] = Field(
        "separate_pass", description="separate_pass: a no-grad forward over the whole step first, statistics over "
        "the step; in_forward: the model's CE from the training forward's own hidden states, statistics per "
        "micro-batch (one trunk forward; needs loss.reduction token_mean)")

    @model_validator(mode="after")
    def _keys_of_mode(self) -> Rho1Settings:
        owners = {"temperature": "weighted", "eps": "weighted", "w_max": "weighted",
                  "skip_fraction": "token_skip", "keep_fraction": "topk"}
        for key in self.model_fields_set:
            if key in owners and owners[key] != self.mode:
                raise ValueError(f"`{key}` only applies to mode {owners[key]}, not {self.mode}")
        return self


class Rho1Recipe(Strict):
    """The recipe sections algorithm rho1 owns."""

    rho1: Rho1Settings


def excess_loss(model_ce: torch.Tensor, ref_target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Signed excess e[t, h] = ℓ[t, h] − ref[t+1+h] on valid pairs, 0 elsewhere. model_ce, labels: [B, S, n]."""
    ref_pairs = per_target_to_heads(ref_target, labels.shape[-1])
    return torch.where(labels != IGNORE_INDEX, model_ce.float() - ref_pairs, torch.zeros((), device=labels.device))


def top_fraction(values: torch.Tensor, fraction: float, min_ce_diff: float | None) -> torch.Tensor:
    """1 on the top ⌈fraction·N⌉ of values [N] (ties: the earlier first), 0 elsewhere and below `min_ce_diff`."""
    count = values.numel()
    keep = min(count, math.ceil(fraction * count - 1e-9))
    order = torch.sort(values, descending=True, stable=True).indices
    selected = torch.zeros(count, device=values.device)
    selected[order[:keep]] = 1.0
    if min_ce_diff is None:
        return selected
    return torch.where(values < min_ce_diff, torch.zeros((), device=values.device), selected)


def rho1_weights(excess: list[torch.Tensor], labels: list[torch.Tensor], *, mode: str, temperature: float,
                 eps: float, w_max: float, skip_fraction: float, keep_fraction: float, min_ce_diff: float | None,
                 train_head0_fully: bool, info: DistInfo) -> PerHeadWeights:
    """Detached weights [B, S, n] per micro-batch from the step's excess losses; per-head metrics; and per-head
    weight histograms [n, HISTOGRAM_BINS] over [0, HISTOGRAM_MAX] (the step's pairs, all ranks)."""

    def rule(head: int, values: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        mean, std = values.mean(), values.std(unbiased=False)
        signal = {"excess_mean": float(mean), "excess_std": float(std)}
        if head == 0 and train_head0_fully:
            return torch.ones(values.numel(), device=values.device), signal
        if mode == "weighted":
            capped = None if min_ce_diff is None else values < min_ce_diff
            return exp_weights(values, mean, std, temperature=temperature, eps=eps, w_max=w_max,
                               capped=capped), signal
        return top_fraction(values, keep_fraction if mode == "topk" else 1.0 - skip_fraction, min_ce_diff), signal

    return per_head_weights(excess, [lab != IGNORE_INDEX for lab in labels], rule, info, prefix="rho1",
                            stats=("selected_frac", "weight_mean", "weight_std", "weight_max"))


class Rho1Weighting(PairSignalWeighting):
    """Per step: the model's own per-pair CE (a no-grad pass), the reference's CE per target token, the signed
    excess, then per-head weights over the whole step. With `scoring: in_forward` the same per micro-batch, the
    model's CE taken from the training forward's own hidden states (`weights_in_forward`)."""

    def __init__(self, settings: Rho1Settings, model_ce: Callable[[StepBatch], torch.Tensor],
                 reference_ce: Callable[[StepBatch], torch.Tensor], info: DistInfo,
                 reference: torch.nn.Module | None = None, chunk_size: int = 256) -> None:
        self.settings = settings
        self.scoring = settings.scoring
        self.chunk_size = chunk_size
        self.reference = reference  # the online reference model; None when its CEs come from the cache
        self.model_ce = model_ce
        self.reference_ce = reference_ce
        self.info = info
        self.record = PerHeadRecord("rho1", per_micro_batch=settings.scoring == "in_forward")

    def signal(self, batch: StepBatch) -> torch.Tensor:
        return excess_loss(self.model_ce(batch), self.reference_ce(batch), batch.labels)

    def signal_in_forward(self, hidden: list[torch.Tensor], model, batch: StepBatch) -> torch.Tensor:
        zero = torch.zeros(batch.labels.shape, device=batch.labels.device)
        _, model_ce, _ = fused_linear_mtp_ce(hidden, model.unembedding.weight, batch.labels, zero,
                                             bias=model.unembedding.bias, chunk_size=self.chunk_size)
        return excess_loss(model_ce, self.reference_ce(batch), batch.labels)

    def weigh(self, excess: list[torch.Tensor], labels: list[torch.Tensor]) -> list[torch.Tensor]:
        s = self.settings
        weights, metrics, histogram = rho1_weights(
            excess, labels, mode=s.mode, temperature=s.temperature, eps=s.eps, w_max=s.w_max,
            skip_fraction=s.skip_fraction, keep_fraction=s.keep_fraction, min_ce_diff=s.min_ce_diff,
            train_head0_fully=s.train_head0_fully, info=self.info)
        self.record.add(metrics, histogram)
        return weights


def reference_cache_target(sections: Rho1Config, recipe: Recipe) -> Path:
    """Where `wmtp score-reference` writes the cache of this config (its Rho-1 keys) and recipe; refuses a recipe
    of another scheme or a config without `reference_cache` and `reference_model`."""
    from ...runtime.storage import is_remote

    if recipe.algorithm != "rho1" or sections.reference_cache is None or sections.reference_model is None:
        raise ConfigError("score-reference needs a recipe with algorithm: rho1 and a config with reference_model "
                          "and reference_cache")
    if is_remote(sections.reference_cache):
        raise ConfigError(f"reference_cache {sections.reference_cache}: score-reference writes a local file; upload "
                          "it to the URL afterwards (training reads it from there)")
    return Path(sections.reference_cache)


def reference_cache_key(sequences: SequenceSet, tokenizer, reference: ReferenceSource) -> str:
    """The fingerprint a reference cache of these training sequences must carry (sequences, tokenizer, reference
    files): written by `wmtp score-reference`, checked when training reads the cache."""
    from ...model.build import resolve_model_path
    from .cache import fingerprint

    return fingerprint(sequences, tokenizer, resolve_model_path(reference.path, "reference_model.path"))


# ------------------------------------------------------------------------------------------------ construction
def build(settings: Rho1Recipe, context: SchemeContext) -> Rho1Weighting:
    """The model's own per-pair CE comes from a no-grad pass of the stepped (wrapped) model; the reference's from
    the cache when the config names one, else from the reference model run online."""
    from ...model.mtp import MTPLoss  # here: the scheme's settings load without transformers

    chunk_size = context.plan.chunk_size
    sections = scheme_config(context.config, "rho1")
    cached = sections.reference_cache is not None
    reference = load_reference(sections.reference_model, context.tokenizer, context.info.device,
                               load_weights=not cached)

    @torch.no_grad()
    def model_ce(batch: StepBatch) -> torch.Tensor:
        with context.autocast:
            return context.wrapped(batch.input_ids, batch.attention_mask, MTPLoss(batch.labels, chunk_size=chunk_size),
                                   trunk=context.trunk_states(batch)).ce

    if cached:
        from ...runtime.storage import local_path
        from .cache import read_cache

        cache = read_cache(Path(local_path(sections.reference_cache, "reference_cache")),
                           reference_cache_key(context.train_set, context.tokenizer, sections.reference_model))

        def reference_ce(batch: StepBatch) -> torch.Tensor:
            return cache[batch.rows].to(batch.input_ids.device)
    else:
        def reference_ce(batch: StepBatch) -> torch.Tensor:
            return score_reference_batch(reference, batch.input_ids, batch.attention_mask, context.autocast,
                                         chunk_size)

    check_in_forward("rho1", settings.rho1.scoring, context)
    return Rho1Weighting(settings.rho1, model_ce, reference_ce, context.info, reference, chunk_size)


PLUGIN = SchemePlugin(settings=Rho1Recipe, build=build)
