"""Checks that every `grpo` key changes behaviour (collected into test_keys.KEY_CHECKS). Each builds the scheme the
trainer builds (the tiny run of test_keys, algorithm grpo, micro-batches of 8) and looks at its rollouts, weights or
metrics as the trainer gets them. The reward's own keys other than `kind` and `function` act inside
`rewards.make_reward`, which the scheme calls with `grpo.reward` as the critic calls it with `critic.reward`: their
checks are the critic's."""

from __future__ import annotations

import torch

from helpers.critic_key_checks import (
    check_reward_batch_size,
    check_reward_check,
    check_reward_model,
    check_reward_positive_label,
    check_reward_timeout_s,
)
from helpers.grpo_runs import forward_weights
from wmtp import IGNORE_INDEX
from wmtp.data.sources import Example

DIGITS = {"kind": "function", "function": "helpers.rewards:digit_share"}


def grpo_trainer(kit, train: dict | None = None, **grpo):
    settings = {"reward": DIGITS, "group_size": 4, "max_new_tokens": 6, **grpo}
    return kit.trainer(recipe={"algorithm": "grpo", "grpo": settings,
                               "train": {"micro_batch_size": 8, **(train or {})}})


def rollout(kit, **grpo):
    """(scheme, the first rollout's micro-batches, their weights)."""
    trainer = grpo_trainer(kit, **grpo)
    batches = trainer.scheme.step_batches(0, trainer.step_batches())
    return trainer.scheme, batches, trainer.scheme.step_weights(batches)


def completions(batch) -> list[tuple[int, ...]]:
    """Each row's completion tokens (the targets of head 0)."""
    valid = batch.labels[..., 0] != IGNORE_INDEX
    return [tuple(batch.input_ids[r, 1:][valid[r, :-1]].tolist()) for r in range(batch.input_ids.shape[0])]


def distinct_per_group(batches, group_size: int) -> list[int]:
    rows = [c for b in batches for c in completions(b)]
    return [len(set(rows[k:k + group_size])) for k in range(0, len(rows), group_size)]


def check_group_size(kit) -> None:
    """`grpo.group_size` is how many completions share a prompt: micro-batches of 8 hold 4 prompts × 2 or 2 × 4."""
    for size, prompts in ((2, 4), (4, 2)):
        _, batches, _ = rollout(kit, group_size=size)
        rows = batches[0].rows.tolist()
        assert len(rows) == 8 and len(set(rows)) == prompts
        assert all(len(set(rows[k:k + size])) == 1 for k in range(0, 8, size))


def check_rollout_every(kit) -> None:
    """`grpo.rollout_every` is how many steps train on one rollout before the next is sampled."""
    for every, reused in ((1, False), (2, True)):
        scheme = grpo_trainer(kit, rollout_every=every).scheme
        first = scheme.step_batches(0, [])
        assert (scheme.step_batches(1, []) is first) == reused


def check_temperature(kit) -> None:
    """`grpo.temperature`: a cold sampler repeats itself within a group, a hot one does not."""
    _, cold, _ = rollout(kit, temperature=0.01)
    _, hot, _ = rollout(kit, temperature=5.0)
    assert sum(distinct_per_group(cold, 4)) < sum(distinct_per_group(hot, 4))


def check_top_p(kit) -> None:
    """`grpo.top_p`: a tiny nucleus keeps only the most probable token (every group repeats one completion)."""
    _, narrow, _ = rollout(kit, top_p=1e-6)
    _, full, _ = rollout(kit, top_p=1.0)
    assert set(distinct_per_group(narrow, 4)) == {1} and max(distinct_per_group(full, 4)) > 1


def check_max_new_tokens(kit) -> None:
    """`grpo.max_new_tokens` bounds the completions."""
    lengths = {n: [len(c) for b in rollout(kit, max_new_tokens=n)[1] for c in completions(b)] for n in (2, 6)}
    assert max(lengths[2]) <= 2 < max(lengths[6]) <= 6


def check_eps(kit) -> None:
    """`grpo.eps` is added to the group's std: a large one shrinks the advantages."""
    small, _, _ = rollout(kit, eps=0.0)
    large, _, _ = rollout(kit, eps=10.0)
    a, b = small.metrics()["grpo/advantage_abs_mean"], large.metrics()["grpo/advantage_abs_mean"]
    assert b < 0.1 * a and a > 0


def check_kl_coef(kit) -> None:
    """`grpo.kl_coef`: after a step, head 0's weights move off the advantage by β·(π_ref/π_θ − 1); without it they
    are the advantage, as on every other head."""
    for coef in (0.0, 1.0):
        trainer = grpo_trainer(kit, kl_coef=coef)
        trainer.train_step()
        trainer.step = 1
        batches = trainer.scheme.step_batches(1, [])
        weights = forward_weights(trainer, batches)
        valid = batches[0].labels != IGNORE_INDEX
        both = valid[..., 0] & valid[..., 1]
        head0, head1 = weights[0][..., 0][both], weights[0][..., 1][both]
        assert torch.equal(head0, head1) == (coef == 0.0)
        assert ("grpo/kl" in trainer.scheme.metrics()) == (coef > 0)


TEXTS = [Example("", "x = 1\n", "jsonl:t", "t/0"), Example("", "x = (\n", "jsonl:t", "t/1")]


def check_reward_kind(kit) -> None:
    """`grpo.reward.kind` picks the source the scheme scores its completions with: a function, or `verifiable`."""
    constant = grpo_trainer(kit, reward={"kind": "function", "function": "helpers.rewards:constant"}).scheme
    parses = grpo_trainer(kit, reward={"kind": "verifiable", "check": "parses"}).scheme
    assert constant.reward(TEXTS) == [0.5, 0.5] and parses.reward(TEXTS) == [1.0, 0.0]
    constant.step_batches(0, [])
    assert constant.metrics()["grpo/reward_mean"] == 0.5 and constant.metrics()["grpo/zero_variance_groups"] == 1.0


def check_reward_function(kit) -> None:
    """`grpo.reward.function` names the user's function the completions are scored with."""
    digits = grpo_trainer(kit).scheme
    constant = grpo_trainer(kit, reward={"kind": "function", "function": "helpers.rewards:constant"}).scheme
    numbers = [Example("", "12ab", "jsonl:t", "t/0")]
    assert digits.reward(numbers) == [0.5] and constant.reward(numbers + numbers) == [0.5, 0.5]
    assert digits.reward([Example("", "1234", "jsonl:t", "t/0")]) == [1.0]


GRPO_KEY_CHECKS = {
    "recipe.grpo.reward.kind": check_reward_kind,
    "recipe.grpo.reward.check": check_reward_check,
    "recipe.grpo.reward.timeout_s": check_reward_timeout_s,
    "recipe.grpo.reward.model": check_reward_model,
    "recipe.grpo.reward.positive_label": check_reward_positive_label,
    "recipe.grpo.reward.batch_size": check_reward_batch_size,
    "recipe.grpo.reward.function": check_reward_function,
    "recipe.grpo.group_size": check_group_size,
    "recipe.grpo.rollout_every": check_rollout_every,
    "recipe.grpo.temperature": check_temperature,
    "recipe.grpo.top_p": check_top_p,
    "recipe.grpo.max_new_tokens": check_max_new_tokens,
    "recipe.grpo.eps": check_eps,
    "recipe.grpo.kl_coef": check_kl_coef,
}
