"""Rho-1's config sections, declared without torch (`wmtp.weighting.CONFIG_SECTIONS` names this module), so a
config error answers before any heavy import: `reference_model`, the frozen reference, and `reference_cache`, the
file of its scores that `wmtp score-reference` writes."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr

from ...config import Strict
from .. import SchemeConfig


class ReferenceSource(Strict):
    """Rho-1's reference model: a pretrained causal LM sharing the trained model's tokenizer."""

    path: str = Field(description="hub id, directory, GGUF file or `pkg:<package>/<file>`")
    tokenizer: str | None = Field(None, description="tokenizer location when it is not next to the model")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype the reference runs in")
    hf_token: SecretStr | None = Field(None, description="token for a gated hub reference; never printed")


class Rho1Config(SchemeConfig):
    """The config's top-level keys Rho-1 owns. A config may serve several recipes (its reference also trained by
    a baseline recipe), so these keys are accepted with any algorithm and used by Rho-1 alone."""

    reference_model: ReferenceSource | None = Field(
        None, description="Rho-1's frozen reference (same tokenizer as `model`); bfloat16 on GPUs via `dtype`")
    reference_cache: str | None = Field(
        None, description="Rho-1: file of reference CEs written by `wmtp score-reference`; read instead of "
        "running the reference (a fingerprint mismatch is an error)")

    def frozen_model(self) -> ReferenceSource | None:
        """The reference runs beside the trained model in every step unless its scores come from the cache."""
        return self.reference_model if self.reference_cache is None else None


CONFIG = Rho1Config
