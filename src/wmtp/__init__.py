"""wmtp: Weighted Multi-Token Prediction for language models.

The names below load on first use (PEP 562), so `import wmtp.cli` (and `wmtp --help`) does not import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "IGNORE_INDEX": "loss",
    "fused_linear_mtp_ce": "loss",
    "loss_denominator": "loss",
    "mean1_clip": "loss",
    "mtp_labels": "loss",
    "per_target_to_heads": "loss",
    "weighted_mtp_loss": "loss",
    "GradNormScores": "model.mtp",
    "MTPConfig": "model.mtp",
    "MTPLoss": "model.mtp",
    "MTPModel": "model.mtp",
    "MTPOutput": "model.mtp",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
