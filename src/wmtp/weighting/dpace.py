"""D-PACE weighting (docs/method.md §5.7): a draft depth weighs by the expected accepted-token credit it unlocks.

After "D-PACE: Dynamic Position-Aware Cross-Entropy for Parallel Speculative Drafting" (arXiv:2605.18810), as
vllm-project/speculators implements it (`losses/utils.py: dpace_loss_decay`), with the wmtp heads as the draft
positions: in self-speculative decoding (§6) head 0 is the base model's own token, always kept, and heads 1…n−1
draft the chain x[t+2], …, x[t+n] from the same position t; draft j is kept only when drafts 1…j all are.

Per valid pair, from the model's own detached CE: q[t,h] = exp(−ℓ[t,h]), the probability head h gives its label;
smoothed q̃ = (1 − α)·q + α (α = `alpha`); P[t,j] = Π_{1≤l≤j} q̃[t,l], the chance drafts 1…j all pass; and
w[t,h] = Σ_{j≥h} m[t,j]·P[t,j] for h ≥ 1, the expected number of accepted drafts that need draft h. Head 0 weighs
1. An ignored pair weighs 0, adds no credit and passes the chain on unchanged (q̃ = 1), as the source does. No
statistics over the step: each pair's weight depends on its own position only, so `scoring: in_forward` (the
default: the CE from the training forward's own hidden states) and `separate_pass` give the same weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field

from ..config import Strict
from ..loss import IGNORE_INDEX, fused_linear_mtp_ce
from ..runtime.distributed import DistInfo
from .base import PairSignalWeighting, SchemeContext, SchemePlugin, StepBatch, check_in_forward
from .per_head import PerHeadRecord, per_head_weights


class DPaceSettings(Strict):
    """Recipe section `dpace`: each draft depth weighs by the accepted-token credit it unlocks at its position."""

    alpha: float = Field(0.5, ge=0, le=1, description="q̃ = (1 − α)·q + α smooths each draft's confidence q = "
                         "exp(−CE) (the paper's Eq. 7 and its default 0.5); 1: every draft counts as accepted, "
                         "w = the number of valid depths from h on; 0: the raw confidences")
    scoring: Literal["in_forward", "separate_pass"] = Field(
        "in_forward", description="in_forward: the CE from the training forward's own hidden states (one trunk "
        "forward; needs loss.reduction token_mean); separate_pass: from a no-grad forward first (any reduction; "
        "what a hybrid needs). The weights are the same: D-PACE takes no statistics over the step")


class DPaceRecipe(Strict):
    """The recipe section algorithm dpace owns (all defaults when absent)."""

    dpace: DPaceSettings = Field(default_factory=DPaceSettings)


def dpace_weights(ce: torch.Tensor, labels: torch.Tensor, alpha: float) -> torch.Tensor:
    """Detached float32 weights [B, S, n] from the per-pair CE and labels [B, S, n] (module docstring).

    q̃ = (1 − α)·exp(−ce) + α on valid pairs of heads ≥ 1, 1 elsewhere; P = cumprod over heads; the credit m·P
    (0 at head 0) summed from each head to the last; times m. Head 0: m. Every weight lies in [0, n − 1]."""
    with torch.no_grad():
        valid = labels != IGNORE_INDEX
        drafts = valid.clone()
        drafts[..., 0] = False
        smooth = torch.where(drafts, (1.0 - alpha) * torch.exp(-ce.detach().float()) + alpha, 1.0)
        credit = torch.cumprod(smooth, dim=-1) * drafts
        unlocked = credit.flip(-1).cumsum(-1).flip(-1)
        weights = unlocked * drafts
        weights[..., 0] = valid[..., 0].float()
    return weights


class DPaceWeighting(PairSignalWeighting):
    """Per micro-batch: each pair's CE, then `dpace_weights`; the per-head statistics (over the step, or per
    micro-batch with `scoring: in_forward`) are only logged."""

    def __init__(self, settings: DPaceSettings, model_ce: Callable[[StepBatch], torch.Tensor], info: DistInfo,
                 chunk_size: int = 256) -> None:
        self.settings = settings
        self.scoring = settings.scoring
        self.model_ce = model_ce
        self.info = info
        self.chunk_size = chunk_size
        self.record = PerHeadRecord("dpace", per_micro_batch=settings.scoring == "in_forward")

    def signal(self, batch: StepBatch) -> torch.Tensor:
        return self.model_ce(batch)

    def signal_in_forward(self, hidden: list[torch.Tensor], model, batch: StepBatch) -> torch.Tensor:
        zero = torch.zeros(batch.labels.shape, device=batch.labels.device)
        _, ce, _ = fused_linear_mtp_ce(hidden, model.unembedding.weight, batch.labels, zero,
                                       bias=model.unembedding.bias, chunk_size=self.chunk_size)
        return ce

    def weigh(self, ce: list[torch.Tensor], labels: list[torch.Tensor]) -> list[torch.Tensor]:
        weights = [dpace_weights(c, lab, self.settings.alpha) for c, lab in zip(ce, labels, strict=True)]
        # the weights are final; the per-head pass only gathers their statistics and histograms over the ranks
        result = per_head_weights(weights, [lab != IGNORE_INDEX for lab in labels], lambda _h, w: (w, {}),
                                  self.info, prefix="dpace", stats=("weight_mean", "weight_std", "weight_max"))
        self.record.add(result.metrics, result.histograms)
        return weights


def build(settings: DPaceRecipe, context: SchemeContext) -> DPaceWeighting:
    """With `separate_pass`, the CE comes from a no-grad pass of the stepped (wrapped) model, so DDP and FSDP2
    gather the parameters as in training."""
    from ..model.mtp import MTPLoss  # here: the scheme's settings load without transformers

    chunk_size = context.plan.chunk_size

    @torch.no_grad()
    def model_ce(batch: StepBatch) -> torch.Tensor:
        with context.autocast:
            return context.wrapped(batch.input_ids, batch.attention_mask, MTPLoss(batch.labels, chunk_size=chunk_size),
                                   trunk=context.trunk_states(batch)).ce

    check_in_forward("dpace", settings.dpace.scoring, context)
    return DPaceWeighting(settings.dpace, model_ce, context.info, chunk_size)


PLUGIN = SchemePlugin(settings=DPaceRecipe, build=build)
