"""docs/method.md's claims about the weighting schemes, held to the code: each test computes a claim with the
scheme's own functions and checks the number or the rule the text states."""

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import wmtp.weighting.rho1.scheme as rho1_scheme
from wmtp.loss import fused_linear_mtp_ce
from wmtp.runtime.distributed import DistInfo
from wmtp.weighting.base import StepBatch
from wmtp.weighting.dpace import dpace_weights
from wmtp.weighting.gradnorm import gradnorm_weights
from wmtp.weighting.grpo import GRPOSettings, kl_weights, sample_tokens
from wmtp.weighting.rho1.scheme import Rho1Settings, Rho1Weighting, rho1_weights

ONE = DistInfo(0, 1, 0, torch.device("cpu"))
METHOD = Path(__file__).resolve().parents[2] / "docs" / "method.md"


def section(number: str) -> str:
    """The text of `### §<number>` (or `## §<number>`) up to the next heading of any level."""
    text = METHOD.read_text()
    match = re.search(rf"^#+ §{re.escape(number)} .*?(?=^#)", text, flags=re.S | re.M)
    assert match, f"docs/method.md has no §{number}"
    return match.group(0)


def rho1(excess: list[torch.Tensor], labels: list[torch.Tensor], **keys) -> list[torch.Tensor]:
    """rho1_weights with the settings' defaults for every key not given."""
    s = Rho1Settings(**keys)
    weights, _, _ = rho1_weights(excess, labels, mode=s.mode, temperature=s.temperature, eps=s.eps, w_max=s.w_max,
                                 skip_fraction=s.skip_fraction, keep_fraction=s.keep_fraction,
                                 min_ce_diff=s.min_ce_diff, train_head0_fully=s.train_head0_fully, info=ONE)
    return weights


# ------------------------------------------------------------------------------------------------ Rho-1
def test_min_ce_diff_in_weighted_mode_caps_excluded_pairs_at_the_average_pairs_weight_not_at_1():
    """§5.2: below `min_ce_diff`, a pair weighs at most what a pair of average excess weighs and at most what any
    pair above the threshold weighs; with normal e, the defaults and 95% below, that is s ≈ 1.28 (the number the
    text gives), above 1."""
    text = " ".join(section("5.2").split())
    stated = float(re.search(r"95% of a head's pairs below `min_ce_diff`, s ≈ ([0-9.]+)", text).group(1))
    e = torch.randn(1, 20_000, 1, generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(e.shape, dtype=torch.long)
    threshold = float(torch.quantile(e.flatten(), 0.95))
    (w,) = rho1([e], [labels], min_ce_diff=threshold)
    below = e < threshold
    average_pair = float(w[below].max())  # every excluded pair above the mean has u capped at 1, the z = 0 pair's
    assert average_pair == pytest.approx(stated, abs=0.01)
    assert average_pair > 1.0 and float(w.mean()) == pytest.approx(1.0, abs=1e-5)
    assert float(w[below].max()) <= float(w[~below].min())
    assert float((w[below] == average_pair).float().mean()) == pytest.approx(45 / 95, abs=0.01)
    assert float((w[below] > 1.0).float().mean()) > 0.5


def test_ties_keep_rank_micro_batch_row_position_order_as_docstring_and_method_say():
    """Equal excess: `topk` keeps the first K valid pairs of a head in step order (micro-batch, then row, then
    position), each head on its own; the module docstring and §5.2 state that order."""
    order = "rank, then micro-batch, then row, then position"
    assert order in " ".join(rho1_scheme.__doc__.split()) and order in " ".join(section("5.2").split())
    labels = [torch.zeros(2, 3, 2, dtype=torch.long), torch.zeros(1, 3, 2, dtype=torch.long)]
    labels[0][0, 0, 1] = -100  # head 1 loses its first pair: its order shifts, head 0's does not
    excess = [torch.zeros(lab.shape) for lab in labels]
    first, second = rho1(excess, labels, mode="topk", keep_fraction=4 / 9)
    assert first[..., 0].tolist() == [[1, 1, 1], [1, 0, 0]] and second[..., 0].tolist() == [[0, 0, 0]]
    assert first[..., 1].tolist() == [[0, 1, 1], [1, 1, 0]] and second[..., 1].tolist() == [[0, 0, 0]]


def test_in_forward_cuts_top_k_per_micro_batch_not_over_the_step():
    """§5: with `scoring: in_forward` the top-K cut is taken over each micro-batch's own pairs: a micro-batch of
    low excess keeps its ⌈k·N⌉ pairs, where the step's cut keeps none of them."""
    assert "over one micro-batch" in " ".join(section("5").split())
    labels = torch.zeros(1, 4, 1, dtype=torch.long)
    labels[0, 3] = -100  # positions 0-2 have a target, each micro-batch N = 3
    batches = [StepBatch(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long), labels.clone(),
                         rows=torch.tensor([row])) for row in (0, 1)]
    reference = torch.tensor([[0.0, -10.0, -10.0, -10.0], [0.0, 0.0, 0.0, 0.0]])  # row 0's excess is 10 higher

    def reference_ce(batch: StepBatch) -> torch.Tensor:  # as the cached reference: [B, S] by training row
        return reference[batch.rows]

    unembedding = torch.nn.Linear(4, 5)
    hidden = [torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(1))]  # one head's [B, S, D]
    with torch.no_grad():
        model_ce = fused_linear_mtp_ce(hidden, unembedding.weight, labels, torch.zeros(1, 4, 1),
                                       bias=unembedding.bias)[1]

    def scheme(scoring: str) -> Rho1Weighting:
        return Rho1Weighting(Rho1Settings(mode="topk", keep_fraction=0.5, scoring=scoring),
                             model_ce=lambda batch: model_ce, reference_ce=reference_ce, info=ONE)

    inside = scheme("in_forward")
    model = SimpleNamespace(unembedding=unembedding)  # what weights_fn reads of the model: its unembedding
    per_micro_batch = [inside.weights_in_forward(i, b)(hidden, model) for i, b in enumerate(batches)]
    over_step = scheme("separate_pass").step_weights(batches)
    assert [int(w.sum()) for w in per_micro_batch] == [2, 2]  # ⌈0.5·3⌉ in each micro-batch
    assert [int(w.sum()) for w in over_step] == [3, 0]  # ⌈0.5·6⌉ over the step, all in row 0's micro-batch


# ------------------------------------------------------------------------------------------------ gradnorm
def test_gradnorm_is_a_biased_reweighting_toward_hard_pairs_not_importance_sampling():
    """§5.4: importance sampling by q ∝ g, corrected by 1/(N·q), has the unweighted expected gradient; gradnorm's
    weights grow with g and change the gradient itself."""
    assert "gradnorm is not importance sampling" in " ".join(section("5.4").split())
    gen = torch.Generator().manual_seed(0)
    n, width, n_vocab = 64, 8, 11
    x = torch.randn(n, width, dtype=torch.float64, generator=gen)
    y = torch.randint(n_vocab, (n,), generator=gen)
    unembedding = torch.randn(n_vocab, width, dtype=torch.float64, generator=gen, requires_grad=True)
    logits = x @ unembedding.T
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    per_pair = torch.stack([torch.autograd.grad(ce[i], unembedding, retain_graph=True)[0].flatten()
                            for i in range(n)])  # [n, V·D]
    g = (logits.detach().softmax(-1) - torch.nn.functional.one_hot(y, n_vocab)).norm(dim=-1)
    (w,), *_ = gradnorm_weights([g.float().view(1, n, 1)], [y.view(1, n, 1)], temperature=1.0, eps=0.05,
                                w_max=3.0, direction="up", info=ONE)
    w = w.view(n).double()
    uniform = per_pair.mean(0)
    q = g / g.sum()
    importance_sampled = (q[:, None] * per_pair / (n * q[:, None])).sum(0)  # E_{i ~ q}[∇ℓ_i / (N·q_i)]
    assert torch.allclose(importance_sampled, uniform, atol=1e-12)
    weighted = (w[:, None] * per_pair).mean(0)
    assert float((weighted - uniform).norm()) > 0.3 * float(uniform.norm())
    hard = g > g.median()
    assert float(w[hard].mean()) > 1.0 > float(w[~hard].mean())


# ------------------------------------------------------------------------------------------------ GRPO's k3
THETA = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0], dtype=torch.float64)
REFERENCE = torch.tensor([0.0, 1.5, -0.5, 1.0, 0.0, -1.0, 0.5], dtype=torch.float64)


def sampling_distribution(temperature: float, top_p: float, draws: int = 200_000) -> torch.Tensor:
    """What the rollouts' `sample_tokens` draws from THETA's logits: [V], counted over a uniform grid."""
    uniforms = (torch.arange(draws, dtype=torch.float64) + 0.5) / draws
    tokens = sample_tokens(THETA.float().expand(draws, -1), uniforms, temperature, top_p)
    return torch.bincount(tokens, minlength=THETA.numel()).double() / draws


def k3_terms(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every token y: GRPO's head-0 weight term β·(e^d − 1) with β = 1, k3, and ℓ = −log π_θ(y); [V] each."""
    model_ce = -theta.log_softmax(-1)
    reference_ce = -REFERENCE.log_softmax(-1)
    extra, k3 = kl_weights(model_ce.detach().view(1, -1), reference_ce.view(1, -1),
                           torch.ones(1, theta.numel(), dtype=torch.bool), 1.0)
    return extra.view(-1).double(), k3.view(-1).double(), model_ce


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    return (p_logits.softmax(-1) * (p_logits.log_softmax(-1) - q_logits.log_softmax(-1))).sum()


def test_k3_value_estimates_kl_theta_ref_but_its_gradient_is_that_of_kl_ref_theta():
    """§5.6: on tokens drawn at temperature 1 and top_p 1, E[k3] = KL(π_θ‖π_ref), while the expected gradient of
    the weighted CE, E[β(e^d − 1)·∇ℓ], is ∇KL(π_ref‖π_θ), not ∇KL(π_θ‖π_ref); §5.6 says which is which."""
    text = " ".join(section("5.6").split())
    assert "k3 is unbiased for KL(π_θ ‖ π_ref)" in text and "= ∇KL(π_ref ‖ π_θ)" in text
    theta = THETA.clone().requires_grad_(True)
    extra, k3, model_ce = k3_terms(theta)
    q = sampling_distribution(1.0, 1.0)
    assert float((q * k3).sum()) == pytest.approx(float(kl(THETA, REFERENCE)), abs=1e-4)
    expected_gradient = torch.autograd.grad((q * extra * model_ce).sum(), theta)[0]
    (reverse,) = torch.autograd.grad(kl(REFERENCE, theta), theta)
    (forward,) = torch.autograd.grad(kl(theta, REFERENCE), theta)
    assert torch.allclose(expected_gradient, reverse, atol=1e-4)
    assert float((expected_gradient - forward).abs().max()) > 0.05


def test_k3_is_biased_away_from_temperature_1_and_top_p_1_by_the_amounts_stated():
    """§5.6's example: KL(π_θ‖π_ref) = 0.809; E[k3] is 0.886 at T = 0.5 and 0.730 at top_p 0.8; the GRPO settings'
    descriptions say the estimate needs temperature 1 and top_p 1."""
    text = " ".join(section("5.6").split())
    stated = re.search(r"KL\(π_θ ‖ π_ref\) = ([0-9.]+), E\[k3\] is ([0-9.]+) at T = 0.5 and ([0-9.]+) at top_p 0.8",
                       text)
    assert stated, "§5.6 no longer gives the 7-token example"
    kl_stated, at_half, at_top_p = map(float, stated.groups())
    _, k3, _ = k3_terms(THETA)
    assert float(kl(THETA, REFERENCE)) == pytest.approx(kl_stated, abs=5e-4)
    assert float((sampling_distribution(0.5, 1.0) * k3).sum()) == pytest.approx(at_half, abs=5e-4)
    assert float((sampling_distribution(1.0, 0.8) * k3).sum()) == pytest.approx(at_top_p, abs=5e-4)
    for key in ("temperature", "top_p", "kl_coef"):
        assert "unbiased only at temperature 1 and top_p 1" in GRPOSettings.model_fields[key].description


# ------------------------------------------------------------------------------------------------ D-PACE
def test_dpace_worked_example_and_alpha_1_rule_are_what_the_code_gives():
    """§5.7: the example's q, α and weights as the text prints them; α = 1 is the linear decay n−1, …, 1."""
    text = " ".join(section("5.7").split())
    example = re.search(r"q\[t,·\] = \(·, ([\d.]+), ([\d.]+), ([\d.]+)\), α = ([\d.]+): .*?"
                        r"w\[t,·\] = \(([\d.]+), ([\d.]+), ([\d.]+), ([\d.]+)\)", text)
    assert example, "§5.7 has no worked example in the expected form"
    q = torch.tensor([0.5, *(float(v) for v in example.groups()[:3])], dtype=torch.float64)
    labels = torch.full((1, 1, 4), 5)
    weights = dpace_weights(-q.log().view(1, 1, 4), labels, float(example.group(4)))
    assert weights.view(4).tolist() == pytest.approx([float(v) for v in example.groups()[4:]], abs=1e-6)
    assert "a linear decay n−1, n−2, …, 1" in text
    assert dpace_weights(torch.rand(1, 1, 5), torch.full((1, 1, 5), 5), 1.0).view(5).tolist() == [1, 4, 3, 2, 1]
