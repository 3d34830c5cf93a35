"""The step plan: micro-batch size, accumulation, world size, total steps and the per-epoch order of rows."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import ConfigError, DataSettings, Training
from .sequences import epoch_order


@dataclass(frozen=True)
class StepPlan:
    """How the training sequences are cut into optimizer steps, fixed in set-up: each step takes
    `grad_accum_steps` global micro-batches of `micro_batch_size × world_size` sequences from a fixed order per
    epoch (`epoch_order`); an incomplete last step of an epoch is dropped."""

    micro_batch_size: int
    grad_accum_steps: int
    world_size: int
    total_steps: int
    steps_per_epoch: int
    shuffle_seed: int
    chunk_size: int  # valid pairs per CE chunk on the fast path (recipe loss.chunk_size)
    eval_batches: int | None  # cap on validation micro-batches
    mask_prompt: bool

    @property
    def sequences_per_step(self) -> int:
        return self.micro_batch_size * self.world_size * self.grad_accum_steps

    def micro_batch_rows(self, global_index: int, rank: int, n_sequences: int) -> torch.Tensor:
        """The training-set rows of rank `rank`'s slice of global micro-batch `global_index`."""
        per_epoch = self.steps_per_epoch * self.grad_accum_steps
        epoch, within = divmod(global_index, per_epoch)
        order = epoch_order(n_sequences, self.shuffle_seed, epoch)
        start = within * self.micro_batch_size * self.world_size + rank * self.micro_batch_size
        return order[start:start + self.micro_batch_size]


def plan_steps(n_sequences: int, recipe_train: Training, recipe_data: DataSettings, chunk_size: int,
               world_size: int) -> StepPlan:
    """The step plan of a recipe's `train` settings over `n_sequences` training sequences: total steps are the
    smaller of max_steps and num_epochs × steps per epoch."""
    t = recipe_train
    per_step = t.micro_batch_size * world_size * t.grad_accum_steps
    per_epoch = n_sequences // per_step
    if per_epoch == 0:
        raise ConfigError(f"data: {n_sequences} training sequences, fewer than one optimizer step needs ({per_step}); "
                          "lower micro_batch_size or grad_accum_steps, or add data")
    candidates = [t.max_steps] if t.max_steps is not None else []
    if t.num_epochs is not None:
        candidates.append(max(1, math.ceil(t.num_epochs * per_epoch)))
    return StepPlan(micro_batch_size=t.micro_batch_size, grad_accum_steps=t.grad_accum_steps, world_size=world_size,
                    total_steps=min(candidates), steps_per_epoch=per_epoch, shuffle_seed=recipe_data.shuffle_seed,
                    chunk_size=chunk_size, eval_batches=t.eval_batches, mask_prompt=recipe_data.mask_prompt)
