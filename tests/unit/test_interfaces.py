"""The interfaces between the parts: the loss a forward takes as one typed object (`MTPLoss`, `GradNormScores`),
and what a weighting scheme's plugin adds to the command line (Rho-1's `score-reference`)."""

from __future__ import annotations

import inspect

import pytest
import torch
from helpers.models import batch, tiny_llama

from wmtp import IGNORE_INDEX, GradNormScores, MTPLoss, MTPModel, loss_denominator, mtp_labels
from wmtp.loss import fused_linear_grad_norm_sq


def test_forward_takes_the_loss_as_one_object_and_no_mode_switches():
    """`trunk` is an input, not a mode: the trunk's states from a cache (`TrunkStates`) instead of a trunk forward."""
    names = list(inspect.signature(MTPModel.forward).parameters)
    assert names == ["self", "input_ids", "attention_mask", "objective", "position_ids", "return_logits", "trunk"]


def test_mtp_loss_fields_are_what_the_loss_uses():
    torch.manual_seed(0)
    model = MTPModel.from_base(tiny_llama(), n_heads=3)
    x, mask = batch(2)
    labels = mtp_labels(x, 3, attention_mask=mask)
    weights = torch.rand(labels.shape, generator=torch.Generator().manual_seed(1))
    plain = model(x, mask, MTPLoss(labels, weights)).loss
    total = loss_denominator(labels, weights, reduction="token_mean")
    assert torch.allclose(model(x, mask, MTPLoss(labels, weights, normalizer=2 * total)).loss, plain / 2)
    head0 = model(x, mask, MTPLoss(labels, weights, head_coef=[1.0, 0.0, 0.0])).loss
    assert not torch.allclose(head0, plain)
    assert torch.equal(model(x, mask, MTPLoss(labels, weights, chunk_size=5)).ce,
                       model(x, mask, MTPLoss(labels, weights, chunk_size=1000)).ce)
    with pytest.raises(ValueError, match="negative"):
        model(x, mask, MTPLoss(labels, -weights))
    assert torch.isfinite(model(x, mask, MTPLoss(labels, -weights, allow_negative=True)).loss)


def test_weights_fn_makes_the_weights_from_the_forwards_own_hidden_states():
    model = MTPModel.from_base(tiny_llama(), n_heads=2)
    x, mask = batch(2)
    labels = mtp_labels(x, 2, attention_mask=mask)
    seen = []

    def make(hidden, got):
        seen.append((len(hidden), hidden[0].requires_grad, got is model))
        return torch.full(labels.shape, 2.0)

    out = model(x, mask, MTPLoss(labels, weights_fn=make))
    assert seen == [(2, False, True)] and torch.equal(out.weights, torch.full(labels.shape, 2.0))
    assert torch.allclose(out.loss, model(x, mask, MTPLoss(labels, torch.full(labels.shape, 2.0))).loss)
    with pytest.raises(ValueError, match="weights or weights_fn, not both"):
        MTPLoss(labels, torch.ones(labels.shape), weights_fn=make)


def test_grad_norm_scores_replace_the_loss():
    model = MTPModel.from_base(tiny_llama(), n_heads=2)
    x, mask = batch(2)
    labels = mtp_labels(x, 2, attention_mask=mask)
    out = model(x, mask, GradNormScores(labels, chunk_size=3))
    hidden, _ = model.head_hidden_states(x, mask)
    want = fused_linear_grad_norm_sq(hidden, model.unembedding.weight, labels, bias=model.unembedding.bias,
                                     chunk_size=3)
    assert out.loss is None and out.ce is None and torch.equal(out.grad_norm_sq, want)
    assert (out.grad_norm_sq[labels == IGNORE_INDEX] == 0).all()


def test_labels_of_the_wrong_shape_are_refused():
    model = MTPModel.from_base(tiny_llama(), n_heads=2)
    x, mask = batch(2)
    with pytest.raises(ValueError, match=r"labels must be \[B, S, n\]"):
        model(x, mask, MTPLoss(mtp_labels(x, 3)))
