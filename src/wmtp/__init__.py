"""wmtp: Weighted Multi-Token Prediction for language models."""

from .loss import (
    IGNORE_INDEX,
    fused_linear_mtp_ce,
    loss_denominator,
    mean1_clip,
    mtp_labels,
    per_target_to_heads,
    weighted_mtp_loss,
)
from .model import MTPConfig, MTPModel, MTPOutput

__all__ = [
    "IGNORE_INDEX",
    "MTPConfig",
    "MTPModel",
    "MTPOutput",
    "fused_linear_mtp_ce",
    "loss_denominator",
    "mean1_clip",
    "mtp_labels",
    "per_target_to_heads",
    "weighted_mtp_loss",
]
__version__ = "0.1.0"
