"""Reward functions that recipes name as `helpers.rewards:<function>` (the tests directory is on the path)."""

from wmtp.data.sources import Example


def digit_share(examples: list[Example]) -> list[float]:
    """The reward of the synthetic task: the share of the completion's characters that are digits."""
    return [sum(ch.isdigit() for ch in ex.completion) / max(len(ex.completion), 1) for ex in examples]


def constant(examples: list[Example]) -> list[float]:
    return [0.5 for _ in examples]
