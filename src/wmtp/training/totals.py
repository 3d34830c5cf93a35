"""The sums of one optimizer step (per-head CE, top-1 hits, weights, tokens), reduced over ranks into metrics."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from ..loss import IGNORE_INDEX
from ..runtime import distributed as dist_utils
from ..runtime.distributed import DistInfo
from ..weighting.base import StepBatch


# ------------------------------------------------------------------------------------------- small parts
@dataclass
class StepTotals:
    """Sums over one optimizer step's micro-batches (then over ranks), in float64: per-head CE, correct top-1
    predictions and valid pairs [n]; the loss; the weights' sum, sum of squares and zeros over valid pairs; real
    tokens and valid pairs. Weight extremes are kept apart (they reduce by max, not sum)."""

    ce: torch.Tensor
    correct: torch.Tensor
    head_pairs: torch.Tensor
    loss: torch.Tensor
    weight_sum: torch.Tensor
    weight_sq: torch.Tensor
    weight_zero: torch.Tensor
    tokens: torch.Tensor
    pairs: torch.Tensor
    w_min: float = math.inf
    w_max: float = -math.inf

    @classmethod
    def zeros(cls, n_heads: int, device: torch.device) -> StepTotals:
        def zero(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.float64, device=device)

        return cls(zero(n_heads), zero(n_heads), zero(n_heads), *(zero() for _ in range(6)))

    def _summed(self) -> list[str]:
        return [f.name for f in fields(self) if f.name not in ("w_min", "w_max")]

    def add(self, out, batch: StepBatch, weights: torch.Tensor | None) -> None:
        """Add one micro-batch's forward output (ce, correct [B, S, n], loss) and weights."""
        valid = batch.labels != IGNORE_INDEX
        wv = torch.ones_like(batch.labels, dtype=torch.float32)[valid] if weights is None else weights[valid].float()
        self.ce += out.ce.sum(dim=(0, 1)).double()
        self.correct += out.correct.sum(dim=(0, 1)).double()
        self.head_pairs += valid.sum(dim=(0, 1)).double()
        self.loss += out.loss.detach().double()
        self.weight_sum += wv.sum().double()
        self.weight_sq += wv.double().pow(2).sum()
        self.weight_zero += (wv == 0).sum().double()
        self.tokens += batch.attention_mask.sum().double()
        self.pairs += valid.sum().double()
        if wv.numel():
            self.w_min, self.w_max = min(self.w_min, float(wv.min())), max(self.w_max, float(wv.max()))

    def all_reduce(self, info: DistInfo) -> None:
        """Sum every total over the ranks in one collective; the weight extremes by max."""
        names = self._summed()
        flat = torch.cat([getattr(self, name).reshape(-1) for name in names])
        dist_utils.all_reduce_sum(flat, info)
        for name, part in zip(names, flat.split([getattr(self, name).numel() for name in names]), strict=True):
            setattr(self, name, part.view_as(getattr(self, name)))
        if info.distributed:
            extremes = torch.tensor([-self.w_min, self.w_max], dtype=torch.float64, device=flat.device)
            torch.distributed.all_reduce(extremes, op=torch.distributed.ReduceOp.MAX)
            self.w_min, self.w_max = -float(extremes[0]), float(extremes[1])

    def metrics(self) -> dict[str, float]:
        pairs = max(float(self.pairs), 1.0)
        w_mean = float(self.weight_sum) / pairs
        count = self.head_pairs.clamp_min(1)
        metrics = {"train/loss": float(self.loss), "weights/mean": w_mean,
                   "weights/std": math.sqrt(max(float(self.weight_sq) / pairs - w_mean**2, 0.0)),
                   "weights/min": self.w_min, "weights/max": self.w_max,
                   "weights/frac_zero": float(self.weight_zero) / pairs}
        for h in range(self.ce.numel()):
            if self.head_pairs[h] > 0:  # a head without a valid pair this step measured nothing: no metric
                metrics[f"train/ce_head{h}"] = float(self.ce[h] / count[h])
                metrics[f"train/acc_head{h}"] = float(self.correct[h] / count[h])
        return metrics
