"""Checks that every `hybrid` key changes behaviour (collected into test_keys.KEY_CHECKS). Each builds the scheme the
trainer builds (the tiny run of test_keys, algorithm hybrid over gradnorm and the uniform baseline) and calls its
`step_weights` on the first optimizer step's micro-batches, as the trainer does."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from wmtp import IGNORE_INDEX
from wmtp.config import ConfigError

GRADNORM = {"temperature": 0.5}


def step_weights(kit, **hybrid) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, valid) of the first micro-batch of the first step."""
    settings = {"components": ["gradnorm", "baseline-mtp"], **hybrid}
    sections = {"gradnorm": GRADNORM} if "gradnorm" in settings["components"] else {}
    trainer = kit.trainer(recipe={"algorithm": "hybrid", "hybrid": settings, **sections})
    batches = trainer.step_batches()
    return trainer.scheme.step_weights(batches)[0], batches[0].labels != IGNORE_INDEX


def check_components(kit) -> None:
    """`hybrid.components` are the schemes combined: gradnorm alone re-weights, the uniform baseline alone does
    not, and both together (product) give gradnorm's weights again (uniform is the product's identity)."""
    both, valid = step_weights(kit, components=["gradnorm", "baseline-mtp"])
    alone, _ = step_weights(kit, components=["gradnorm"])
    uniform, _ = step_weights(kit, components=["baseline-mtp"])
    assert torch.equal(uniform[valid], torch.ones_like(uniform[valid]))
    assert torch.allclose(both, alone, atol=1e-6) and not torch.allclose(alone[valid], uniform[valid])
    with pytest.raises((ConfigError, ValidationError), match="cannot be part of a hybrid"):
        step_weights(kit, components=["hybrid"])


def check_combine(kit) -> None:
    """`hybrid.combine`: with the uniform baseline, a product keeps gradnorm's spread and an equal mixture
    halves it (w = (w_g + 1) / 2)."""
    product, valid = step_weights(kit, combine="product")
    mixture, _ = step_weights(kit, combine="mixture")
    assert torch.allclose(mixture[valid], (product[valid] + 1) / 2, atol=1e-5)


def check_mixture_weights(kit) -> None:
    """`hybrid.mixture_weights` are the α of a mixture: α = (1, 0) is gradnorm alone, (0, 1) the baseline."""
    first, valid = step_weights(kit, combine="mixture", mixture_weights=[1.0, 0.0])
    second, _ = step_weights(kit, combine="mixture", mixture_weights=[0.0, 1.0])
    alone, _ = step_weights(kit, components=["gradnorm"])
    assert torch.allclose(first, alone, atol=1e-6)
    assert torch.allclose(second[valid], torch.ones_like(second[valid]))
    with pytest.raises((ConfigError, ValidationError), match="only applies to combine: mixture"):
        step_weights(kit, mixture_weights=[1.0, 1.0])


def check_eps(kit) -> None:
    """`hybrid.eps` is the floor of the combined weights."""
    low, valid = step_weights(kit, eps=0.0, w_max=100.0)
    high, _ = step_weights(kit, eps=0.9, w_max=100.0)
    assert low[valid].min() < 0.9 <= float(high[valid].min()) + 1e-6


def check_w_max(kit) -> None:
    """`hybrid.w_max` is the ceiling of the combined weights."""
    wide, valid = step_weights(kit, w_max=100.0)
    narrow, _ = step_weights(kit, w_max=1.2)
    assert wide[valid].max() > 1.2 >= float(narrow[valid].max()) - 1e-6


HYBRID_KEY_CHECKS = {
    "recipe.hybrid.components": check_components,
    "recipe.hybrid.combine": check_combine,
    "recipe.hybrid.mixture_weights": check_mixture_weights,
    "recipe.hybrid.eps": check_eps,
    "recipe.hybrid.w_max": check_w_max,
}
