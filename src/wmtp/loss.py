"""Per-head labels and the weighted multi-token prediction loss (docs/method.md §1 and §3).

One indexing convention for the whole code base: head h at position t predicts x[t+1+h].

Two implementations of the same loss:

- `weighted_mtp_loss` is the plain reference on materialised logits [B, S, n, V]. It is short enough to
  check by eye, and the tests hold the fast path to it.
- `fused_linear_mtp_ce` is the fast path the trainer uses: it takes the heads' final hidden states and the
  shared unembedding, walks over chunks of valid (token, head) pairs, and keeps only one chunk of logits
  alive at a time. The gradient of each chunk is taken right away (the weights are known before the
  forward), so no logits are stored for the backward pass (the trick of Liger's fused linear CE).

The gradient-norm scheme's per-pair signal ‖∂ℓ/∂logits‖² comes in the same two forms: `logit_grad_norm_sq` on
given logits, and `fused_linear_grad_norm_sq`, chunked from the heads' hidden states without gradient
(docs/method.md §5.4).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
Reduction = Literal["token_mean", "weight_mean"]
REDUCTIONS: tuple[str, ...] = ("token_mean", "weight_mean")


def mtp_labels(
    input_ids: torch.Tensor,
    n_heads: int,
    *,
    attention_mask: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    prompt_mask: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Labels for every (position, head) pair: `y[b, t, h] = input_ids[b, t+1+h]`.

    input_ids: [B, S]; attention_mask: [B, S], 1 on real tokens; document_ids: [B, S], the packed document
    each token belongs to; prompt_mask: [B, S], True on prompt tokens that must not be targets.
    A pair is ignored when t+1+h >= S, when either token is padding, when the target is a prompt token,
    or when the two tokens belong to different packed documents.
    Returns a LongTensor [B, S, n_heads].
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
    if n_heads < 1:
        raise ValueError(f"n_heads must be >= 1, got {n_heads}")
    batch, seq = input_ids.shape
    for name, extra in (("attention_mask", attention_mask), ("document_ids", document_ids),
                        ("prompt_mask", prompt_mask)):
        if extra is not None and extra.shape != input_ids.shape:
            raise ValueError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(extra.shape)}")
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    targetable = real if prompt_mask is None else real & ~prompt_mask.bool()
    labels = torch.full((batch, seq, n_heads), ignore_index, dtype=torch.long, device=input_ids.device)
    for h in range(min(n_heads, seq - 1)):
        offset = h + 1
        ok = real[:, :-offset] & targetable[:, offset:]
        if document_ids is not None:
            ok &= document_ids[:, :-offset] == document_ids[:, offset:]
        labels[:, :-offset, h] = torch.where(ok, input_ids[:, offset:], ignore_index)
    return labels


def per_target_to_heads(signal: torch.Tensor, n_heads: int, fill: float = 0.0) -> torch.Tensor:
    """Map a signal defined per target token j to (position, head) pairs: `w[b, t, h] = s[b, t+1+h]`.

    The one helper for this mapping (a reference CE of x_j, a TD error of generating x_j, ...).
    signal: [B, S]. Returns [B, S, n_heads]; pairs whose target lies past the end hold `fill`.
    """
    batch, seq = signal.shape
    out = signal.new_full((batch, seq, n_heads), fill)
    for h in range(min(n_heads, seq - 1)):
        out[:, : seq - h - 1, h] = signal[:, h + 1:]
    return out


def _head_coef_tensor(head_coef, n_heads: int, device: torch.device) -> torch.Tensor:
    if head_coef is None:
        return torch.ones(n_heads, dtype=torch.float32, device=device)
    coef = torch.as_tensor(head_coef, dtype=torch.float32, device=device)
    if coef.shape != (n_heads,):
        raise ValueError(f"head_coef must have one value per head ({n_heads}), got shape {tuple(coef.shape)}")
    if bool((coef < 0).any()):
        raise ValueError(f"head_coef must be >= 0, got {coef.tolist()}")
    return coef


def check_weights(weights: torch.Tensor | None, labels: torch.Tensor, reduction: str,
                   allow_negative: bool) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if weights is None:
        return
    if weights.shape != labels.shape:
        raise ValueError(f"weights must have the shape of labels {tuple(labels.shape)}, got {tuple(weights.shape)}")
    if weights.requires_grad:
        raise ValueError("weights carry gradient: importance weights must be detached (docs/method.md §3)")
    valid = labels != IGNORE_INDEX
    if not bool(torch.isfinite(weights[valid]).all()):
        raise ValueError("weights are not finite on some valid (token, head) pair")
    if bool((weights[valid] < 0).any()):
        if reduction == "weight_mean":
            raise ValueError("negative weights cannot be used with reduction='weight_mean'")
        if not allow_negative:
            raise ValueError("negative weights: only a scheme that declares allow_negative may produce them")


def pair_coefficients(
    labels: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    head_coef=None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """`λ_h · w[t,h] · m[t,h]` for every pair, fp32 [..., n]; 0 on ignored pairs (whatever the weight there)."""
    lam = _head_coef_tensor(head_coef, labels.shape[-1], labels.device)
    valid = labels != ignore_index
    w = torch.ones_like(labels, dtype=torch.float32) if weights is None else weights.float()
    return torch.where(valid, w * lam, torch.zeros((), device=labels.device))


def loss_denominator(
    labels: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    head_coef=None,
    reduction: str = "token_mean",
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """The denominator of one micro-batch: `Σ λ_h m` (token_mean) or `Σ λ_h w m` (weight_mean), fp32 scalar.

    The trainer sums it over all micro-batches of an optimizer step and all-reduces it over ranks, then
    passes the total as `normalizer`; that makes 1×8 and 8×1 give the same update.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    use_weights = weights if reduction == "weight_mean" else None
    return pair_coefficients(labels, use_weights, head_coef=head_coef, ignore_index=ignore_index).sum()


def safe_divide(numerator: torch.Tensor, denominator: torch.Tensor | float) -> torch.Tensor:
    # A micro-batch (or step) without a valid pair has numerator 0 and denominator 0: it contributes 0.
    den = torch.as_tensor(denominator, dtype=torch.float32, device=numerator.device)
    return numerator / den.clamp_min(torch.finfo(torch.float32).tiny)


def weighted_mtp_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    head_coef=None,
    reduction: str = "token_mean",
    normalizer: torch.Tensor | float | None = None,
    allow_negative: bool = False,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """The plain reference weighted MTP loss (docs/method.md §3).

    logits: [B, S, n, V]; labels: [B, S, n] from `mtp_labels`; weights: [B, S, n], detached, or None for
    uniform; head_coef: λ_h, n values (default 1). The per-pair CE is computed in fp32.
    token_mean:  Σ λ w m ℓ / Σ λ m.   weight_mean: Σ λ w m ℓ / Σ λ w m.
    `normalizer` replaces the denominator (the trainer passes the one summed over the whole step).
    """
    if logits.dim() != 4 or logits.shape[:3] != labels.shape:
        raise ValueError(f"logits must be [B, S, n, V] matching labels {tuple(labels.shape)}, "
                         f"got {tuple(logits.shape)}")
    check_weights(weights, labels, reduction, allow_negative)
    vocab = logits.shape[-1]
    ce = F.cross_entropy(logits.float().reshape(-1, vocab), labels.reshape(-1),
                         ignore_index=ignore_index, reduction="none").view(labels.shape)
    coef = pair_coefficients(labels, weights, head_coef=head_coef, ignore_index=ignore_index)
    if normalizer is None:
        normalizer = loss_denominator(labels, weights, head_coef=head_coef, reduction=reduction,
                                      ignore_index=ignore_index)
    return safe_divide((coef * ce).sum(), normalizer)


def mean1_clip(weights: torch.Tensor, valid: torch.Tensor, eps: float = 0.05, w_max: float = 3.0) -> torch.Tensor:
    """Weight post-processing `mean1_clip(ε, w_max)` over the valid pairs (docs/method.md §4).

    Returns clip(s·w, ε, w_max) on valid pairs and 0 elsewhere, fp32 and detached, where s > 0 is the scale that
    makes the mean over the valid pairs exactly 1: every weight lies in [ε, w_max] and they average 1.
    weights, valid: same shape; the valid weights must be finite and >= 0 (raw scores such as exp(z/T)). Needs
    0 <= ε <= 1 <= w_max. Degenerate inputs: no valid pair → all zeros; every valid weight 0 → 1 on every valid
    pair; so many zero weights that even with every positive weight at w_max the mean stays below 1 → w_max on
    the positive weights and ε on the zero ones (their mean falls short of 1).
    """
    if not 0 <= eps <= 1 <= w_max:
        raise ValueError(f"mean1_clip needs 0 <= eps <= 1 <= w_max, got eps={eps}, w_max={w_max}")
    valid = valid.bool()
    out = torch.zeros(weights.shape, dtype=torch.float32, device=weights.device)
    # float64: raw scores can span many decades, so s can be far from 1; the mean must still be 1 after rounding.
    x = weights.detach()[valid].to(torch.float64)
    if x.numel() == 0:
        return out
    if not bool(torch.isfinite(x).all()) or bool((x < 0).any()):
        raise ValueError("mean1_clip needs finite weights >= 0 on the valid pairs")
    out[valid] = _clip_to_mean1(x, eps, w_max).float()
    return out


def _clip_to_mean1(x: torch.Tensor, eps: float, w_max: float) -> torch.Tensor:
    """clip(s·x, eps, w_max) with mean exactly 1, x: [N] float64 >= 0 (degenerate cases as in `mean1_clip`).

    f(s) = mean(clip(s·x, eps, w_max)) is continuous, non-decreasing and linear between its kinks s = eps/x_i and
    s = w_max/x_i, from f(0+) = eps to f(∞) = (eps·#zeros + w_max·#positive)/N. It is evaluated at every kink
    with sorted x and prefix sums, and s is interpolated linearly inside the interval where f crosses 1.
    """
    n = x.numel()
    positive = torch.sort(x[x > 0]).values
    p = positive.numel()
    if p == 0 or eps == w_max:  # nothing to rank (or eps = w_max = 1): every pair weighs 1
        return torch.ones_like(x)
    at_zero = eps * (n - p)  # a zero weight stays at eps whatever s
    if at_zero + w_max * p < n:
        return torch.where(x > 0, w_max, eps).to(x.dtype)
    kinks = torch.cat([eps / positive, w_max / positive])
    kinks = torch.sort(kinks[kinks > 0]).values
    prefix = torch.cat([positive.new_zeros(1), torch.cumsum(positive, 0)])
    low = torch.searchsorted(positive, eps / kinks, right=True)  # s·x <= eps: raised to eps
    high = p - torch.searchsorted(positive, w_max / kinks)  # s·x >= w_max: cut to w_max
    mid = prefix[p - high] - prefix[low]
    f = (at_zero + eps * low.to(x.dtype) + w_max * high.to(x.dtype) + kinks * mid) / n
    f = torch.cummax(f, 0).values  # monotone, also after rounding
    k = min(int(torch.searchsorted(f, torch.ones(1, dtype=f.dtype, device=f.device))), f.numel() - 1)
    s_hi, f_hi = float(kinks[k]), float(f[k])
    s_lo, f_lo = (float(kinks[k - 1]), float(f[k - 1])) if k > 0 else (0.0, eps)
    s = s_lo + (1.0 - f_lo) * (s_hi - s_lo) / (f_hi - f_lo) if f_hi > f_lo else s_hi
    return (s * x).clamp(eps, w_max)


class _FusedLinearMTPCrossEntropy(torch.autograd.Function):
    """Σ coef·CE over selected pairs, with the gradient taken chunk by chunk during the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, coef, chunk_size, compute_grad=True):
        # hidden: [P, D] rows of the valid pairs; targets, coef: [P]. Autocast is off in here: the matmuls run
        # in the hidden states' dtype and the softmax in fp32. Without `compute_grad` (a pass under no_grad: a
        # scheme's scoring) only the CE is computed: one [chunk, V] matmul instead of three.
        compute_dtype = hidden.dtype
        w = weight.to(compute_dtype)
        b = None if bias is None else bias.to(compute_dtype)
        if compute_grad:
            grad_hidden = torch.empty_like(hidden)
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            grad_bias = None if bias is None else torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        ce = torch.empty(targets.shape, dtype=torch.float32, device=hidden.device)
        correct = torch.empty(targets.shape, dtype=torch.bool, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        rows = torch.arange(min(chunk_size, max(hidden.shape[0], 1)), device=hidden.device)
        fp32 = compute_dtype == torch.float32
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            h = hidden[start:end]
            y = targets[start:end]
            c = coef[start:end]
            r = rows[: end - start]
            # One [chunk, V] fp32 buffer, turned into the gradient in place:
            # d(c·CE)/dlogits = c·(softmax − onehot).
            buf = F.linear(h, w, b).float()
            peak, argmax = buf.max(dim=-1)
            target_logit = buf[r, y]
            total_exp = buf.sub_(peak[:, None]).exp_().sum(dim=-1)
            pair_ce = peak + total_exp.log() - target_logit
            ce[start:end] = pair_ce
            correct[start:end] = argmax == y
            total += (c * pair_ce).sum()
            if not compute_grad:
                del buf
                continue
            buf.div_(total_exp[:, None])
            buf[r, y] -= 1.0
            buf.mul_(c[:, None])
            grad_logits = buf if fp32 else buf.to(compute_dtype)
            grad_hidden[start:end] = grad_logits @ w
            if fp32:
                grad_weight.addmm_(grad_logits.t(), h)
            else:
                grad_weight += (grad_logits.t() @ h).float()
            if grad_bias is not None:
                grad_bias += buf.sum(dim=0)
            del buf, grad_logits
        if not compute_grad:
            ctx.mark_non_differentiable(total, ce, correct)
            return total, ce, correct
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.weight_dtype = weight.dtype
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(ce, correct)
        return total, ce, correct

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_correct):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        if not bool(grad_total == 1):  # the usual case (loss.backward()) needs no scaled copies
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
            grad_weight = grad_weight * grad_total
            grad_bias = None if grad_bias is None else grad_bias * grad_total
        grad_weight = grad_weight.to(ctx.weight_dtype)
        if ctx.has_bias:
            grad_bias = grad_bias.to(ctx.weight_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def valid_pair_rows(head_hidden: list[torch.Tensor], labels: torch.Tensor, chunk_size: int,
                    ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden rows of the valid pairs, [P, D], and their flat indices into [B, S, n], [P], what every fused
    per-pair computation below (and the greedy tokens of acceptance) reads: n head states [B, S, D] stacked to
    [B, S, n, D], rows where labels [B, S, n] != ignore_index. Checks the head count and chunk_size >= 1."""
    if len(head_hidden) != labels.shape[-1]:
        raise ValueError(f"got {len(head_hidden)} head hidden states for labels with {labels.shape[-1]} heads")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    hidden = torch.stack(head_hidden, dim=2)  # [B, S, n, D]
    flat_index = (labels != ignore_index).reshape(-1).nonzero().squeeze(1)
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat_index), flat_index


def fused_linear_mtp_ce(
    head_hidden: list[torch.Tensor],
    unembedding: torch.Tensor,
    labels: torch.Tensor,
    coef: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = 256,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fast path: `Σ coef · CE` over all pairs without materialising [B, S, n, V].

    head_hidden: n tensors [B, S, D], each head's final hidden state (after the shared final norm);
    unembedding: [V, D] (the shared lm_head weight); labels: [B, S, n]; coef: [B, S, n] fp32, the
    per-pair coefficient λ_h·w·m / normalizer (0 on ignored pairs). Only valid pairs are computed,
    `chunk_size` rows at a time. Returns (loss, ce [B, S, n] detached fp32 with 0 on ignored pairs,
    correct [B, S, n] bool: the head's argmax equals the label).
    """
    rows, flat_index = valid_pair_rows(head_hidden, labels, chunk_size, ignore_index)
    targets = labels.reshape(-1).index_select(0, flat_index)
    pair_coef = coef.reshape(-1).index_select(0, flat_index).float()
    compute_grad = torch.is_grad_enabled() and (rows.requires_grad or unembedding.requires_grad)
    with torch.autocast(device_type=rows.device.type, enabled=False):
        total, pair_ce, pair_correct = _FusedLinearMTPCrossEntropy.apply(
            rows, unembedding, bias, targets, pair_coef, chunk_size, compute_grad)
    ce = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    ce.view(-1)[flat_index] = pair_ce
    correct = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    correct.view(-1)[flat_index] = pair_correct
    return total, ce, correct


def _grad_norm_sq_(buf: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """‖softmax(buf) − e_y‖² per row of an fp32 buffer [P, V], which it overwrites (one [P, V] buffer in all)."""
    rows = torch.arange(buf.shape[0], device=buf.device)
    peak = buf.max(dim=-1).values
    buf.sub_(peak[:, None]).exp_()  # e_i = exp(logit_i − max) ∈ [0, 1]
    target = buf[rows, targets]
    buf[rows, targets] = 0.0
    others = buf.sum(dim=-1)  # Σ_{i≠y} e_i
    total = others + target  # Σ_i e_i ≥ 1, so p_i = e_i / total
    # p_i² = exp(2·(logit_i − logsumexp)) ∈ [0, 1]: nothing overflows in fp32 whatever the logits' dtype, and the
    # terms that underflow are below 1e-38. Σ_i p_i² − 2·p_y + 1 is summed as Σ_{i≠y} p_i² + (1 − p_y)², with
    # 1 − p_y = Σ_{i≠y} e_i / total: only non-negative terms, so nothing cancels when p_y → 1 or p_y → 0.
    buf.div_(total[:, None]).square_()
    return buf.sum(dim=-1) + (others / total).square()


def logit_grad_norm_sq(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The squared norm of the CE's gradient at the logits, ‖p − e_y‖² = Σ_i p_i² − 2·p_y + 1 with p = softmax
    (docs/method.md §5.4), in fp32 whatever the logits' dtype. logits: [P, V]; targets: [P]. Returns [P] in [0, 2].
    """
    return _grad_norm_sq_(logits.to(torch.float32, copy=True), targets)


@torch.no_grad()
def fused_linear_grad_norm_sq(
    head_hidden: list[torch.Tensor],
    unembedding: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = 256,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """`logit_grad_norm_sq` of every valid pair without materialising [B, S, n, V] and without any backward.

    head_hidden: n tensors [B, S, D] (after the shared final norm); unembedding: [V, D]; labels: [B, S, n].
    As in `fused_linear_mtp_ce`, only valid pairs are computed, `chunk_size` rows at a time, the matmul in the
    hidden states' dtype and the softmax in one fp32 [chunk, V] buffer. Returns [B, S, n] fp32, 0 on ignored pairs.
    """
    rows, flat_index = valid_pair_rows(head_hidden, labels, chunk_size, ignore_index)
    targets = labels.reshape(-1).index_select(0, flat_index)
    weight = unembedding.to(rows.dtype)
    b = None if bias is None else bias.to(rows.dtype)
    pair = torch.empty(targets.shape, dtype=torch.float32, device=rows.device)
    with torch.autocast(device_type=rows.device.type, enabled=False):
        for start in range(0, rows.shape[0], chunk_size):
            end = min(start + chunk_size, rows.shape[0])
            pair[start:end] = _grad_norm_sq_(F.linear(rows[start:end], weight, b).float(), targets[start:end])
    out = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    out.view(-1)[flat_index] = pair
    return out
