"""What the GRPO tests and key checks share."""

from __future__ import annotations

import torch

from wmtp.model.mtp import MTPLoss
from wmtp.training.trainer import Trainer


def forward_weights(trainer: Trainer, batches) -> list[torch.Tensor]:
    """The weights the trainer's forward uses on each micro-batch: `step_weights`, or with a KL term those the
    training forward makes from its own hidden states (`weights_in_forward`); then the step's end (KL metric)."""
    scheme = trainer.scheme
    weights = scheme.step_weights(batches)
    for k, b in enumerate(batches):
        make = scheme.weights_in_forward(k, b)
        if make is not None:
            with torch.no_grad():
                weights[k] = trainer.wrapped(b.input_ids, b.attention_mask,
                                             MTPLoss(b.labels, weights_fn=make, allow_negative=True)).weights
    scheme.after_backward(None)
    return weights
