import math

import pytest
import torch

from wmtp import IGNORE_INDEX, fused_linear_mtp_ce, loss_denominator, mean1_clip, mtp_labels, weighted_mtp_loss
from wmtp.loss import pair_coefficients


def plain_loss(logits, labels, weights, lam, reduction):
    """The formula of docs/method.md §3, one pair at a time."""
    B, S, n, V = logits.shape
    num = 0.0
    den = 0.0
    for b in range(B):
        for t in range(S):
            for h in range(n):
                y = int(labels[b, t, h])
                if y == IGNORE_INDEX:
                    continue
                row = logits[b, t, h].double()
                ce = -(row[y] - torch.logsumexp(row, 0))
                w = 1.0 if weights is None else float(weights[b, t, h])
                num = num + lam[h] * w * ce
                den += lam[h] * (w if reduction == "weight_mean" else 1.0)
    return num / den if den > 0 else torch.zeros((), dtype=torch.float64)


def random_case(seed, B=2, S=7, n=3, V=11):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, V, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, -2:] = 0
    labels = mtp_labels(x, n, attention_mask=mask)
    logits = torch.randn(B, S, n, V, generator=g, dtype=torch.float64)
    weights = torch.rand(B, S, n, generator=g) * 2
    return logits, labels, weights


@pytest.mark.parametrize("reduction", ["token_mean", "weight_mean"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_and_gradient_match_plain_formula(reduction, seed):
    logits, labels, weights = random_case(seed)
    lam = [1.0, 0.5, 0.25]
    a = logits.clone().requires_grad_(True)
    got = weighted_mtp_loss(a, labels, weights, head_coef=lam, reduction=reduction)
    got.backward()
    b = logits.clone().requires_grad_(True)
    want = plain_loss(b, labels, weights, lam, reduction)
    want.backward()
    assert torch.allclose(got.double(), want, rtol=1e-5)
    assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-7)


def test_token_weights_equal_across_heads_do_not_cancel():
    # The seed normalised weights per position across heads; then a token-level weight did nothing.
    logits, labels, _ = random_case(3)
    uniform = weighted_mtp_loss(logits, labels)
    w = torch.ones(labels.shape)
    w[0, 2, :] = 5.0  # position 2 matters five times more, on every head
    weighted = weighted_mtp_loss(logits, labels, w)
    assert not torch.isclose(uniform, weighted)


def test_weight_mean_ignores_scale_token_mean_does_not():
    logits, labels, w = random_case(4)
    assert torch.allclose(weighted_mtp_loss(logits, labels, w, reduction="weight_mean"),
                          weighted_mtp_loss(logits, labels, 3 * w, reduction="weight_mean"))
    assert torch.allclose(3 * weighted_mtp_loss(logits, labels, w), weighted_mtp_loss(logits, labels, 3 * w))


def test_weights_on_ignored_pairs_have_no_effect_even_nan():
    logits, labels, w = random_case(5)
    w2 = w.clone()
    w2[labels == IGNORE_INDEX] = float("nan")
    assert torch.equal(weighted_mtp_loss(logits, labels, w), weighted_mtp_loss(logits, labels, w2))


def test_no_valid_pair_gives_zero_not_nan():
    logits = torch.randn(1, 4, 2, 5, requires_grad=True)
    labels = torch.full((1, 4, 2), IGNORE_INDEX)
    for reduction in ("token_mean", "weight_mean"):
        loss = weighted_mtp_loss(logits, labels, torch.zeros(1, 4, 2), reduction=reduction)
        loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()
    # all-zero weights with weight_mean: denominator 0, loss 0
    logits2, labels2, _ = random_case(6)
    assert weighted_mtp_loss(logits2, labels2, torch.zeros(labels2.shape), reduction="weight_mean").item() == 0.0


def test_weights_with_gradient_are_refused():
    logits, labels, w = random_case(7)
    with pytest.raises(ValueError, match="detached"):
        weighted_mtp_loss(logits, labels, w.clone().requires_grad_(True))


def test_negative_weights_need_declaration():
    logits, labels, w = random_case(8)
    w = w - 1.0
    with pytest.raises(ValueError, match="negative"):
        weighted_mtp_loss(logits, labels, w)
    with pytest.raises(ValueError, match="weight_mean"):
        weighted_mtp_loss(logits, labels, w, reduction="weight_mean", allow_negative=True)
    assert torch.isfinite(weighted_mtp_loss(logits, labels, w, allow_negative=True))


def test_normalizer_overrides_denominator():
    logits, labels, w = random_case(9)
    num = weighted_mtp_loss(logits, labels, w, normalizer=1.0)
    den = loss_denominator(labels, w)
    assert torch.allclose(num / den, weighted_mtp_loss(logits, labels, w))
    assert torch.isclose(den, (labels != IGNORE_INDEX).sum().float())


def test_head_coefficients_scale_heads():
    logits, labels, _ = random_case(10)
    only_head0 = weighted_mtp_loss(logits, labels, head_coef=[1.0, 0.0, 0.0])
    direct = weighted_mtp_loss(logits[:, :, :1], labels[:, :, :1])
    assert torch.allclose(only_head0, direct)
    with pytest.raises(ValueError, match="one value per head"):
        weighted_mtp_loss(logits, labels, head_coef=[1.0, 1.0])


def plain_mean1_clip(w, valid, eps, w_max):
    vals = [float(v) for v, m in zip(w.flatten(), valid.flatten(), strict=True) if m]
    mean = sum(vals) / len(vals)
    vals = [min(max(v / mean, eps), w_max) for v in vals]
    mean = sum(vals) / len(vals)
    it = iter(v / mean for v in vals)
    return torch.tensor([next(it) if m else 0.0 for m in valid.flatten()]).view(w.shape)


@pytest.mark.parametrize("seed", [0, 1])
def test_mean1_clip_matches_plain(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(3, 8, 2, generator=g).pow(4) * 10
    valid = torch.rand(3, 8, 2, generator=g) > 0.3
    got = mean1_clip(w, valid, eps=0.05, w_max=3.0)
    assert torch.allclose(got, plain_mean1_clip(w, valid, 0.05, 3.0), rtol=1e-5)
    assert math.isclose(got[valid].mean().item(), 1.0, rel_tol=1e-5)
    assert (got[~valid] == 0).all()


def test_mean1_clip_no_valid_pairs():
    assert (mean1_clip(torch.rand(2, 3), torch.zeros(2, 3, dtype=torch.bool)) == 0).all()


@pytest.mark.parametrize("reduction", ["token_mean", "weight_mean"])
@pytest.mark.parametrize("chunk_size", [1, 5, 4096])
def test_fused_path_matches_reference_loss_and_gradients(reduction, chunk_size):
    g = torch.Generator().manual_seed(11)
    B, S, n, D, V = 2, 9, 3, 8, 13
    x = torch.randint(0, V, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, :2] = 0
    labels = mtp_labels(x, n, attention_mask=mask)
    weights = torch.rand(B, S, n, generator=g)
    hidden = [torch.randn(B, S, D, generator=g, requires_grad=True) for _ in range(n)]
    U = torch.randn(V, D, generator=g, requires_grad=True)
    bias = torch.randn(V, generator=g, requires_grad=True)
    lam = [1.0, 0.3, 0.2]

    logits = torch.stack([h @ U.t() + bias for h in hidden], dim=2)
    ref = weighted_mtp_loss(logits, labels, weights, head_coef=lam, reduction=reduction)
    ref_grads = torch.autograd.grad(ref, hidden + [U, bias])

    den = loss_denominator(labels, weights, head_coef=lam, reduction=reduction)
    coef = pair_coefficients(labels, weights, head_coef=lam) / den
    fast, ce, correct = fused_linear_mtp_ce(hidden, U, labels, coef, bias=bias, chunk_size=chunk_size)
    fast_grads = torch.autograd.grad(fast, hidden + [U, bias])

    assert torch.allclose(fast, ref, rtol=1e-5)
    for a, b in zip(fast_grads, ref_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    valid = labels != IGNORE_INDEX
    ref_ce = torch.nn.functional.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="none",
                                               ignore_index=IGNORE_INDEX).view(labels.shape)
    assert torch.allclose(ce[valid], ref_ce[valid].detach(), rtol=1e-5)
    assert (ce[~valid] == 0).all()
    assert torch.equal(correct[valid], logits.argmax(-1)[valid] == labels[valid])


def test_fused_path_scales_with_upstream_gradient_and_runs_in_bf16():
    g = torch.Generator().manual_seed(12)
    B, S, n, D, V = 2, 6, 2, 8, 17
    labels = mtp_labels(torch.randint(0, V, (B, S), generator=g), n)
    coef = pair_coefficients(labels) / loss_denominator(labels)
    hidden = [torch.randn(B, S, D, generator=g, requires_grad=True) for _ in range(n)]
    U = torch.randn(V, D, generator=g, requires_grad=True)
    loss, _, _ = fused_linear_mtp_ce(hidden, U, labels, coef, chunk_size=3)
    once = torch.autograd.grad(loss, [U, *hidden])
    loss, _, _ = fused_linear_mtp_ce(hidden, U, labels, coef, chunk_size=3)
    scaled = torch.autograd.grad(2.5 * loss, [U, *hidden])
    for a, b in zip(once, scaled, strict=True):
        assert torch.allclose(2.5 * a, b, rtol=1e-6)
    low = [h.detach().bfloat16().requires_grad_(True) for h in hidden]
    loss16, _, _ = fused_linear_mtp_ce(low, U, labels, coef, chunk_size=3)
    grads16 = torch.autograd.grad(loss16, [U, *low])
    assert torch.isclose(loss16, loss, rtol=2e-2)
    assert grads16[0].dtype == torch.float32 and grads16[1].dtype == torch.bfloat16
    assert torch.allclose(grads16[0], once[0], atol=2e-2)
