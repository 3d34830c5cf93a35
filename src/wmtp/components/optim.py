"""The optimizer and the learning-rate schedules: AdamW with decoupled weight decay on matrices only, and a
warm-up followed by cosine, linear or constant decay to `min_lr_ratio` (recipe `optim`, `schedule`)."""

from __future__ import annotations

import math

import torch

from ..config import Optimizer, Schedule


def lr_lambda(schedule: Schedule, total_steps: int):
    """The LambdaLR factor of step `step` (0-based) for `schedule` over `total_steps` optimizer steps."""
    def factor(step: int) -> float:
        if step < schedule.warmup_steps:
            return (step + 1) / schedule.warmup_steps
        if schedule.kind == "constant":
            return 1.0
        progress = min(1.0, (step - schedule.warmup_steps) / max(1, total_steps - schedule.warmup_steps))
        if schedule.kind == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return schedule.min_lr_ratio + (1.0 - schedule.min_lr_ratio) * shape

    return factor


def make_optimizer(model: torch.nn.Module, o: Optimizer) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; weight decay on matrices (dim >= 2) only."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=o.lr, betas=o.betas, eps=o.eps)
