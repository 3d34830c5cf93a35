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
    """docs/method.md §4 one value at a time: bisection on the scale s of mean(clip(s·w, eps, w_max)) = 1."""
    vals = [float(v) for v, m in zip(w.flatten(), valid.flatten(), strict=True) if m]

    def mean_at(s):
        return sum(min(max(s * v, eps), w_max) for v in vals) / len(vals)

    lo, hi = 0.0, 1.0
    while mean_at(hi) < 1:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_at(mid) < 1 else (lo, mid)
    it = iter(min(max(hi * v, eps), w_max) for v in vals)
    return torch.tensor([next(it) if m else 0.0 for m in valid.flatten()]).view(w.shape)


def heavy_tailed(seed, shape=(3, 40, 2)):
    """Raw scores where a few pairs dominate: Pareto(α 0.5) draws, as exp(z/T) gives for a sharp T."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(shape, generator=g, dtype=torch.float64).clamp_min(1e-12)
    return u.pow(-2.0), torch.rand(shape, generator=g) > 0.3


@pytest.mark.parametrize(("eps", "w_max"), [(0.05, 3.0), (0.0, 2.0), (0.3, 1.5), (0.0, 100.0)])
@pytest.mark.parametrize("seed", range(6))
def test_mean1_clip_matches_plain_and_keeps_its_bounds(seed, eps, w_max):
    w, valid = heavy_tailed(seed)
    if seed % 2:
        w = torch.rand(w.shape, generator=torch.Generator().manual_seed(seed)).pow(4) * 10
    got = mean1_clip(w, valid, eps=eps, w_max=w_max)
    assert torch.allclose(got, plain_mean1_clip(w, valid, eps, w_max).float(), rtol=1e-5, atol=1e-7)
    assert math.isclose(got[valid].double().mean().item(), 1.0, abs_tol=1e-5)
    assert got[valid].max() <= w_max and got[valid].min() >= eps
    assert (got[~valid] == 0).all() and got.dtype == torch.float32


def test_mean1_clip_bounds_the_values_not_only_their_ratio():
    # the old normalise-clip-normalise gave (0.063, 0.063, 0.063, 3.81) here: w_max bounded only the ratio
    w = torch.tensor([0.01, 0.01, 0.01, 10.0])
    got = mean1_clip(w, torch.ones(4, dtype=torch.bool), eps=0.05, w_max=3.0)
    assert torch.allclose(got, torch.tensor([1 / 3, 1 / 3, 1 / 3, 3.0]))
    # a few pairs dominating a large step (the critic's end-of-document case) stay at w_max
    w = torch.ones(10_000, dtype=torch.float64)
    w[:30] = 1e30
    got = mean1_clip(w, torch.ones_like(w, dtype=torch.bool))
    assert got.max() == 3.0 and math.isclose(got.double().mean().item(), 1.0, abs_tol=1e-6)


@pytest.mark.parametrize("scale", [1e-30, 1e-3, 7.0, 1e25])
def test_mean1_clip_ignores_the_scale_of_its_input(scale):
    w, valid = heavy_tailed(11)
    base = mean1_clip(w, valid)
    assert torch.allclose(mean1_clip(w * scale, valid), base, rtol=1e-5, atol=1e-7)


def test_mean1_clip_detaches_and_ignores_invalid_pairs_even_nan():
    w, valid = heavy_tailed(12)
    w = w.float().requires_grad_(True)
    got = mean1_clip(w, valid)
    assert not got.requires_grad and got.grad_fn is None
    poisoned = w.detach().clone()
    poisoned[~valid] = float("nan")
    assert torch.equal(mean1_clip(poisoned, valid), got)


def test_mean1_clip_degenerate_cases():
    every = torch.ones(6, dtype=torch.bool)
    assert (mean1_clip(torch.rand(2, 3), torch.zeros(2, 3, dtype=torch.bool)) == 0).all()  # no valid pair
    assert torch.equal(mean1_clip(torch.zeros(6), every), torch.ones(6))  # nothing to rank: uniform
    assert torch.equal(mean1_clip(torch.full((6,), 4.2), every), torch.ones(6))  # equal weights: 1
    # 5 zeros, one positive weight: the best is 3.0 for it and eps for the zeros, mean 0.2083 < 1
    short = mean1_clip(torch.tensor([0, 0, 0, 0, 0, 1.0]), every, eps=0.05, w_max=3.0)
    assert torch.allclose(short, torch.tensor([0.05] * 5 + [3.0]))
    # enough positive weights: the zeros stay at eps and the mean is 1
    some = mean1_clip(torch.tensor([0, 0, 1.0, 2.0, 3.0, 4.0]), every, eps=0.05, w_max=3.0)
    assert torch.allclose(some[:2], torch.tensor([0.05, 0.05])) and math.isclose(some.mean().item(), 1, rel_tol=1e-6)
    assert torch.equal(mean1_clip(torch.rand(6), every, eps=1.0, w_max=1.0), torch.ones(6))
    assert torch.allclose(mean1_clip(torch.tensor([1.0, 0, 0]), every[:3], eps=1.0, w_max=5.0), torch.ones(3))
    for eps, w_max in ((1.5, 3.0), (0.05, 0.8), (-0.1, 3.0)):
        with pytest.raises(ValueError, match="0 <= eps <= 1 <= w_max"):
            mean1_clip(torch.rand(6), every, eps=eps, w_max=w_max)
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="finite weights >= 0"):
            mean1_clip(torch.tensor([1.0, bad, 2.0]), every[:3])


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


def test_a_pass_without_gradient_computes_the_same_ce_and_no_gradient():
    """Under no_grad (a scheme's scoring pass) the fused path computes only the CE: the same CE, loss and top-1 as
    the training pass, and a loss that carries no gradient."""
    g = torch.Generator().manual_seed(4)
    labels = mtp_labels(torch.randint(0, 40, (3, 11), generator=g), 3)
    hidden = [torch.randn(3, 11, 8, generator=g, requires_grad=True) for _ in range(3)]
    unembedding = torch.randn(40, 8, generator=g, requires_grad=True)
    coef = pair_coefficients(labels, None) / 7.0
    loss, ce, correct = fused_linear_mtp_ce(hidden, unembedding, labels, coef, chunk_size=5)
    with torch.no_grad():
        loss_ng, ce_ng, correct_ng = fused_linear_mtp_ce(hidden, unembedding, labels, coef, chunk_size=5)
    assert torch.equal(ce, ce_ng) and torch.equal(correct, correct_ng) and torch.equal(loss.detach(), loss_ng)
    assert loss.requires_grad and not loss_ng.requires_grad
