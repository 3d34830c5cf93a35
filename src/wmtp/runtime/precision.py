"""Dtypes and the forward's autocast: what training and evaluation both run a model in."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_or_none(name: str | None) -> torch.dtype | None:
    """The torch dtype of a config's dtype name; None stays None (keep the tensors' own)."""
    return DTYPES[name] if name else None


def autocast_for(device: torch.device, precision: str) -> AbstractContextManager:
    """The forward's autocast context for `compute.precision` (fp32: none); re-entrant, so it can be reused."""
    dtype = _AUTOCAST.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
