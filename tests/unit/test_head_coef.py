"""The depth-coefficient conventions of `mtp.head_coef_rule` (docs/method.md §3): each rule's λ_h, the loss they
give against the same coefficients written out as `mtp.head_coef`, and the errors of a recipe that mixes them."""

import pytest
import torch
from helpers.models import batch, grads_of, perturb_heads, tiny_llama
from pydantic import ValidationError

from wmtp import MTPLoss, MTPModel, mtp_labels
from wmtp.config import MTPShape


def test_no_rule_and_no_head_coef_is_all_ones():
    assert MTPShape(n_heads=4).coefficients == [1.0, 1.0, 1.0, 1.0]
    assert MTPShape(n_heads=1).coefficients == [1.0]


def test_meta_rule_is_all_ones():
    assert MTPShape(n_heads=3, head_coef_rule="meta").coefficients == [1.0, 1.0, 1.0]


def test_deepseek_rule_spreads_the_scale_over_the_extra_heads():
    assert MTPShape(n_heads=4, head_coef_rule="deepseek", head_coef_scale=0.3).coefficients == [1.0] + [0.3 / 3] * 3
    assert MTPShape(n_heads=3, head_coef_rule="deepseek", head_coef_scale=0.1).coefficients == [1.0, 0.05, 0.05]
    assert MTPShape(n_heads=4, head_coef_rule="deepseek").coefficients == [1.0] + [0.3 / 3] * 3  # default λ 0.3
    assert MTPShape(n_heads=1, head_coef_rule="deepseek").coefficients == [1.0]  # no extra head: nothing to share
    assert sum(MTPShape(n_heads=5, head_coef_rule="deepseek", head_coef_scale=0.2).coefficients[1:]) == \
        pytest.approx(0.2)


def test_geometric_rule_decays_by_depth():
    assert MTPShape(n_heads=4, head_coef_rule="geometric", head_coef_decay=0.5).coefficients == [1.0, 0.5, 0.25, 0.125]
    assert MTPShape(n_heads=3, head_coef_rule="geometric").coefficients == [1.0, 0.8, 0.8 ** 2]  # default γ 0.8
    assert MTPShape(n_heads=3, head_coef_rule="geometric", head_coef_decay=1.0).coefficients == [1.0, 1.0, 1.0]


def test_explicit_head_coef_is_the_coefficients():
    assert MTPShape(n_heads=3, head_coef=[1.0, 0.5, 0]).coefficients == [1.0, 0.5, 0.0]


@pytest.mark.parametrize("fields,message", [
    ({"head_coef": [1.0, 0.1, 0.1], "head_coef_rule": "deepseek"}, "`head_coef` .* or `head_coef_rule`, not both"),
    ({"head_coef": [1.0, 1.0, 1.0], "head_coef_rule": "meta"}, "`head_coef` .* or `head_coef_rule`, not both"),
    ({"head_coef_scale": 0.3}, "`head_coef_scale` applies to head_coef_rule: deepseek only .*not set"),
    ({"head_coef_rule": "geometric", "head_coef_scale": 0.3}, "`head_coef_scale` applies to .*deepseek only"),
    ({"head_coef_rule": "meta", "head_coef_scale": 0.3}, "`head_coef_scale` applies to .*deepseek only"),
    ({"head_coef_decay": 0.8}, "`head_coef_decay` applies to head_coef_rule: geometric only .*not set"),
    ({"head_coef_rule": "deepseek", "head_coef_decay": 0.8}, "`head_coef_decay` applies to .*geometric only"),
    ({"head_coef_rule": "exponential"}, "head_coef_rule"),
    ({"head_coef_rule": "deepseek", "head_coef_scale": -0.1}, "head_coef_scale"),
    ({"head_coef_rule": "geometric", "head_coef_decay": 0.0}, "head_coef_decay"),
    ({"head_coef_rule": "geometric", "head_coef_decay": 1.5}, "head_coef_decay"),
])
def test_errors(fields, message):
    with pytest.raises(ValidationError, match=message):
        MTPShape(n_heads=3, **fields)


def _loss_and_grads(head_type: str, head_coef, reduction: str):
    model = MTPModel.from_base(tiny_llama(tie=True), n_heads=4, head_type=head_type)
    perturb_heads(model)
    x, mask = batch(2)
    labels = mtp_labels(x, 4, attention_mask=mask)
    weights = torch.rand(labels.shape, generator=torch.Generator().manual_seed(3)) * 2
    out = model(x, mask, MTPLoss(labels, weights, head_coef=head_coef, reduction=reduction, chunk_size=7))
    out.loss.backward()
    return out.loss.detach(), grads_of(model)


@pytest.mark.parametrize("head_type", ["transformer", "sequential"])
@pytest.mark.parametrize("reduction", ["token_mean", "weight_mean"])
@pytest.mark.parametrize("rule,written_out", [
    ({"head_coef_rule": "deepseek", "head_coef_scale": 0.3}, [1.0, 0.1, 0.1, 0.1]),
    ({"head_coef_rule": "geometric", "head_coef_decay": 0.5}, [1.0, 0.5, 0.25, 0.125]),
    ({"head_coef_rule": "meta"}, [1.0, 1.0, 1.0, 1.0]),
    ({}, None),  # neither key: exactly today's default (head_coef None in the loss), so old runs do not move
])
def test_rule_gives_the_loss_of_its_explicit_head_coef_bit_for_bit(head_type, reduction, rule, written_out):
    shape = MTPShape(n_heads=4, head_type=head_type, **rule)
    loss, grads = _loss_and_grads(head_type, shape.coefficients, reduction)
    want_loss, want_grads = _loss_and_grads(head_type, written_out, reduction)
    assert torch.equal(loss, want_loss)
    assert grads.keys() == want_grads.keys() and len(grads) > 10
    assert all(torch.equal(grads[k], want_grads[k]) for k in grads)


def test_rules_change_the_loss():
    """The rules are not all the same loss: down-weighting the extra heads lowers the weighted mean's numerator."""
    losses = {rule: _loss_and_grads("sequential", MTPShape(n_heads=4, head_coef_rule=rule).coefficients,
                                    "token_mean")[0] for rule in ("meta", "deepseek", "geometric")}
    assert len({float(v) for v in losses.values()}) == 3
