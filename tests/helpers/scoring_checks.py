"""The `scoring` key check every scheme with in_forward scoring shares (rho1, gradnorm, critic)."""

from __future__ import annotations

import pytest
import torch

from wmtp.config import ConfigError
from wmtp.model.mtp import MTPLoss
from wmtp.training.trainer import Trainer


def in_forward_weights(trainer: Trainer, batch) -> torch.Tensor:
    """The weights a scheme with `scoring: in_forward` makes inside the training forward of one micro-batch."""
    assert trainer.scheme.step_weights([batch]) == [None]
    out = trainer.model(batch.input_ids, batch.attention_mask,
                        MTPLoss(batch.labels, weights_fn=trainer.scheme.weights_in_forward(0, batch)))
    return out.weights


def check_scoring(kit, trainer_for) -> None:
    """`<scheme>.scoring`: in_forward weighs each micro-batch inside its own training forward, with statistics
    over that micro-batch; separate_pass weighs the whole step in a pass before. On a step of one micro-batch both
    give the same weights; on a step of two they differ (the statistics span both)."""
    separate, in_forward = trainer_for("separate_pass"), trainer_for("in_forward")
    first = separate.step_batches()[0]
    separate.step = 1
    second = separate.step_batches()[0]
    valid = first.labels != -100
    alone = separate.scheme.step_weights([first])[0]
    together = separate.scheme.step_weights([first, second])[0]
    inside = in_forward_weights(in_forward, first)
    assert torch.allclose(inside, alone, atol=1e-5)
    assert not torch.allclose(inside[valid], together[valid], atol=1e-3)
    with pytest.raises(ConfigError, match="needs loss.reduction token_mean"):
        trainer_for("in_forward", {"loss": {"reduction": "weight_mean"}})
