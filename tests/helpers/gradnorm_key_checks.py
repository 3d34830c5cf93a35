"""Checks that every `gradnorm` key changes behaviour (collected into test_keys.KEY_CHECKS). Each builds the scheme
the trainer builds (the tiny run of test_keys, algorithm gradnorm) and calls its `step_weights` on the first
optimizer steps' micro-batches, as the trainer does."""

from __future__ import annotations

import pytest
import torch

from helpers.scoring_checks import check_scoring
from wmtp import IGNORE_INDEX


def step_weights(kit, steps: int = 1, **gradnorm) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """(weights, valid) of the first micro-batch of step `steps` − 1 after the scheme has seen the steps before,
    and the scheme's metrics of that step."""
    trainer = kit.trainer(recipe={"algorithm": "gradnorm", "gradnorm": gradnorm})
    for step in range(steps):
        trainer.step = step
        batches = trainer.step_batches()
        weights = trainer.scheme.step_weights(batches)
    return weights[0], batches[0].labels != IGNORE_INDEX, trainer.scheme.metrics()


def check_signal(kit) -> None:
    """`gradnorm.signal` is g = ‖p − e_y‖ or g²: the squared signal's mean is the mean of g² (= σ_g² + μ_g²)."""
    _, _, norm = step_weights(kit, signal="norm")
    _, _, squared = step_weights(kit, signal="squared")
    for h in range(3):
        mean, std = norm[f"gradnorm/signal_mean_head{h}"], norm[f"gradnorm/signal_std_head{h}"]
        # a fresh model predicts nearly uniformly (g ≈ 0.998 everywhere): the two means differ by ~1e-3 only
        assert squared[f"gradnorm/signal_mean_head{h}"] == pytest.approx(std ** 2 + mean ** 2, rel=1e-5)
        assert squared[f"gradnorm/signal_mean_head{h}"] != pytest.approx(mean, rel=1e-4)


def check_smoothing(kit) -> None:
    """`gradnorm.smoothing`: with ema the second step's weights depend on the first step; with none they do not."""
    after_none, valid, _ = step_weights(kit, steps=2, smoothing="none")
    after_ema, _, _ = step_weights(kit, steps=2, smoothing="ema")
    second_alone = kit.trainer(recipe={"algorithm": "gradnorm", "gradnorm": {"smoothing": "ema"}})
    second_alone.step = 1
    alone = second_alone.scheme.step_weights(second_alone.step_batches())[0]
    assert torch.equal(after_none, alone)  # the first step of an EMA is the step's own statistics
    assert not torch.allclose(after_ema[valid], alone[valid])


def check_ema_decay(kit) -> None:
    """`gradnorm.ema_decay` is how much of the earlier steps' mean and std the standardisation keeps."""
    _, _, fast = step_weights(kit, steps=2, smoothing="ema", ema_decay=0.0)
    _, _, slow = step_weights(kit, steps=2, smoothing="ema", ema_decay=0.9)
    for h in range(3):
        assert fast[f"gradnorm/ema_std_head{h}"] == pytest.approx(fast[f"gradnorm/signal_std_head{h}"])
        assert slow[f"gradnorm/ema_std_head{h}"] != pytest.approx(slow[f"gradnorm/signal_std_head{h}"], rel=1e-3)


def check_temperature(kit) -> None:
    """`gradnorm.temperature` sharpens (low) or flattens (high) the weights exp(z/T)."""
    sharp, valid, _ = step_weights(kit, temperature=0.3)
    flat, _, _ = step_weights(kit, temperature=5.0)
    assert flat[valid].std() < sharp[valid].std()


def check_eps(kit) -> None:
    """`gradnorm.eps` is the floor: no weight lies below it."""
    low, valid, _ = step_weights(kit, eps=0.0, temperature=0.2)
    high, _, _ = step_weights(kit, eps=0.5, temperature=0.2)
    assert high[valid].min() >= 0.5 and low[valid].min() < 0.3


def check_w_max(kit) -> None:
    """`gradnorm.w_max` is the ceiling: no weight lies above it."""
    capped, valid, _ = step_weights(kit, w_max=1.2, temperature=0.2)
    free, _, _ = step_weights(kit, w_max=50.0, temperature=0.2)
    assert capped[valid].max() <= 1.2 < free[valid].max()  # compared as fp32 numbers, as the weights are


def check_direction(kit) -> None:
    """`gradnorm.direction`: up gives the pairs with the larger gradient norm the larger weights, down the smaller."""
    trainer = kit.trainer(recipe={"algorithm": "gradnorm"})
    batch = trainer.step_batches()[0]
    signal = trainer.scheme.grad_norm_sq(batch)
    up, valid, _ = step_weights(kit, direction="up")
    down, _, _ = step_weights(kit, direction="down")
    for h in range(3):
        order = torch.argsort(signal[..., h][valid[..., h]])
        w_up, w_down = up[..., h][valid[..., h]][order], down[..., h][valid[..., h]][order]
        assert (w_up.diff() >= 0).all() and (w_down.diff() <= 0).all() and w_up[-1] > w_up[0]


def check_gradnorm_scoring(kit) -> None:
    """`gradnorm.scoring`: see helpers.scoring_checks.check_scoring (the same weights on a one-micro-batch step,
    not on two)."""
    def trainer_for(scoring: str, recipe: dict | None = None):
        return kit.trainer(recipe={"algorithm": "gradnorm", "gradnorm": {"scoring": scoring}, **(recipe or {})},
                           name=f"gradnorm-{scoring}")

    check_scoring(kit, trainer_for)


GRADNORM_KEY_CHECKS = {
    "recipe.gradnorm.scoring": check_gradnorm_scoring,
    "recipe.gradnorm.signal": check_signal,
    "recipe.gradnorm.smoothing": check_smoothing,
    "recipe.gradnorm.ema_decay": check_ema_decay,
    "recipe.gradnorm.temperature": check_temperature,
    "recipe.gradnorm.eps": check_eps,
    "recipe.gradnorm.w_max": check_w_max,
    "recipe.gradnorm.direction": check_direction,
}
