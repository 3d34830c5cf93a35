"""Checks that every `dpace` key changes behaviour (collected into test_keys.KEY_CHECKS). Each builds the scheme the
trainer builds (the tiny run of test_keys, algorithm dpace, 3 heads) and makes the weights of the first optimizer
step's micro-batch as the trainer does."""

from __future__ import annotations

import pytest
import torch

from helpers.scoring_checks import in_forward_weights
from wmtp import IGNORE_INDEX
from wmtp.config import ConfigError


def first_weights(kit, **dpace) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, valid) of the first micro-batch of the first step, made as `dpace.scoring` says."""
    trainer = kit.trainer(recipe={"algorithm": "dpace", "dpace": dpace})
    batch = trainer.step_batches()[0]
    if trainer.scheme.scoring == "in_forward":
        return in_forward_weights(trainer, batch), batch.labels != IGNORE_INDEX
    return trainer.scheme.step_weights([batch])[0], batch.labels != IGNORE_INDEX


def check_alpha(kit) -> None:
    """`dpace.alpha` smooths the confidences: at 1 every draft counts as accepted (depth h of 3 heads weighs the
    number of valid depths from h on: 2 then 1), below 1 the weights follow the heads' own confidences and fall."""
    certain, valid = first_weights(kit, alpha=1.0)
    half, _ = first_weights(kit, alpha=0.5)
    later = valid.flip(-1).cumsum(-1).flip(-1).float() * valid
    assert torch.equal(certain[..., 1:], later[..., 1:]) and certain[..., 1].max() == 2.0
    assert torch.equal(half[..., 0], valid[..., 0].float())
    assert (half[..., 1:][valid[..., 1:]] < certain[..., 1:][valid[..., 1:]]).all()


def check_dpace_scoring(kit) -> None:
    """`dpace.scoring`: separate_pass runs a no-grad forward over the step before it, in_forward makes the same
    weights inside the training forward with no pass of its own (and needs loss.reduction token_mean)."""
    separate = kit.trainer(recipe={"algorithm": "dpace", "dpace": {"scoring": "separate_pass"}}, name="separate")
    inside = kit.trainer(recipe={"algorithm": "dpace", "dpace": {"scoring": "in_forward"}}, name="inside")
    batch = separate.step_batches()[0]
    calls: list[int] = []
    hook = separate.model.register_forward_pre_hook(lambda *_: calls.append(1))
    before = separate.scheme.step_weights([batch])[0]
    hook.remove()
    assert calls == [1] and before is not None
    torch.testing.assert_close(in_forward_weights(inside, batch), before, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="dpace.scoring: in_forward .* needs loss.reduction token_mean"):
        kit.trainer(recipe={"algorithm": "dpace", "loss": {"reduction": "weight_mean"}})
    kit.trainer(recipe={"algorithm": "dpace", "dpace": {"scoring": "separate_pass"},
                        "loss": {"reduction": "weight_mean"}}, name="weight-mean")


DPACE_KEY_CHECKS = {
    "recipe.dpace.alpha": check_alpha,
    "recipe.dpace.scoring": check_dpace_scoring,
}
