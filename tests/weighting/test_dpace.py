"""D-PACE weighting (docs/method.md §5.7): the formula against a plain loop, the one-forward path against a
separate reference-loss forward on materialised logits, the gradient of the weighted loss, settings errors, and a
tiny training run through the CLI."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers.models import batch, fast_and_reference, perturb_heads, tiny_gpt2, tiny_llama
from helpers.tiny_run import train_args

from wmtp import IGNORE_INDEX, MTPModel, mtp_labels
from wmtp.cli import main
from wmtp.config import ConfigError, load_recipe
from wmtp.model.mtp import MTPLoss
from wmtp.runtime.distributed import DistInfo
from wmtp.weighting import scheme_settings
from wmtp.weighting.base import StepBatch
from wmtp.weighting.dpace import DPaceSettings, DPaceWeighting, dpace_weights

ONE = DistInfo(0, 1, 0, torch.device("cpu"))
ROOT = Path(__file__).resolve().parents[2]
RECIPE = yaml.safe_load((ROOT / "configs" / "recipes" / "dpace" / "mbpp.yaml").read_text())


def reference_weights(ce: torch.Tensor, labels: torch.Tensor, alpha: float) -> torch.Tensor:
    """The definition written out with loops, in float64: head 0 weighs 1; draft depth h ≥ 1 weighs
    Σ_{j ≥ h, j valid} Π_{1 ≤ l ≤ j, l valid} ((1 − α)·exp(−ce[l]) + α); ignored pairs weigh 0."""
    B, S, n = labels.shape
    out = torch.zeros(B, S, n, dtype=torch.float64)
    for b in range(B):
        for t in range(S):
            valid = [bool(labels[b, t, h] != IGNORE_INDEX) for h in range(n)]
            for h in range(n):
                if not valid[h]:
                    continue
                if h == 0:
                    out[b, t, h] = 1.0
                    continue
                total = 0.0
                for j in range(h, n):
                    if not valid[j]:
                        continue
                    chain = 1.0
                    for lvl in range(1, j + 1):
                        if valid[lvl]:
                            chain *= (1 - alpha) * math.exp(-float(ce[b, t, lvl])) + alpha
                    total += chain
                out[b, t, h] = total
    return out


def random_case(seed: int, B: int = 3, S: int = 7, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """CEs (some near 0, some large) and labels with ignored pairs anywhere, a middle depth included."""
    g = torch.Generator().manual_seed(seed)
    ce = torch.rand(B, S, n, generator=g) * 4.0
    ce[0, 0, :min(n, 4)] = torch.tensor([0.0, 1e-4, 30.0, 0.5])[:n]
    labels = torch.randint(3, 50, (B, S, n), generator=g)
    labels[torch.rand(B, S, n, generator=g) < 0.3] = IGNORE_INDEX
    if n > 2:
        labels[1, 2, 1] = IGNORE_INDEX  # a missing middle depth with valid ones after it
        labels[1, 2, 2:] = 7
    return ce, labels


# ------------------------------------------------------------------------------------------------ the formula
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("n", [1, 2, 4, 6])
def test_weights_equal_the_plain_loop(alpha, n):
    ce, labels = random_case(n * 10 + int(alpha * 10), n=n)
    weights = dpace_weights(ce, labels, alpha)
    assert weights.dtype == torch.float32 and not weights.requires_grad
    torch.testing.assert_close(weights.double(), reference_weights(ce, labels, alpha), rtol=1e-6, atol=1e-7)
    valid = labels != IGNORE_INDEX
    assert (weights[~valid] == 0).all() and (weights[valid] >= 0).all() and (weights <= max(n - 1, 1)).all()
    assert (weights[..., 0] == valid[..., 0].float()).all()


def test_the_worked_example_of_the_method_page():
    """method.md §5.7: q = (·, 0.8, 0.5, 0.25), α = 0.5 → q̃ = (0.9, 0.75, 0.625), P = (0.9, 0.675, 0.421875),
    w = (1, 1.996875, 1.096875, 0.421875)."""
    q = torch.tensor([0.3, 0.8, 0.5, 0.25])
    labels = torch.full((1, 1, 4), 5)
    weights = dpace_weights(-q.log().view(1, 1, 4), labels, 0.5)
    torch.testing.assert_close(weights.view(4), torch.tensor([1.0, 1.996875, 1.096875, 0.421875]))


def test_alpha_1_counts_every_draft_as_accepted_and_alpha_0_uses_the_raw_confidence():
    ce, labels = random_case(3)
    valid = labels != IGNORE_INDEX
    ones = dpace_weights(ce, labels, 1.0)
    later_valid = valid.flip(-1).cumsum(-1).flip(-1).float()  # valid depths j ≥ h
    torch.testing.assert_close(ones[..., 1:], (later_valid * valid)[..., 1:])
    q = torch.exp(-ce)
    raw = dpace_weights(ce, torch.full_like(labels, 5), 0.0)
    torch.testing.assert_close(raw[..., 3], q[..., 1] * q[..., 2] * q[..., 3])
    torch.testing.assert_close(raw[..., 2], q[..., 1] * q[..., 2] * (1 + q[..., 3]))


def test_a_missing_depth_passes_the_chain_on_and_ends_at_the_row_end_break_it():
    """An ignored depth adds no credit and multiplies by 1 (the source's rule); the end, padding and document
    rules of §1 ignore every deeper depth too, so there the chain simply stops."""
    ce = torch.full((1, 1, 4), -math.log(0.6))  # q = 0.6, q̃ = 0.8 at α = 0.5
    labels = torch.tensor([[[5, IGNORE_INDEX, 5, 5]]])
    torch.testing.assert_close(dpace_weights(ce, labels, 0.5).view(4), torch.tensor([1.0, 0.0, 0.8 + 0.64, 0.64]))
    ends = torch.tensor([[[5, 5, IGNORE_INDEX, IGNORE_INDEX]]])
    torch.testing.assert_close(dpace_weights(ce, ends, 0.5).view(4), torch.tensor([1.0, 0.8, 0.0, 0.0]))


def test_weights_fall_with_depth_and_a_more_confident_draft_raises_every_draft_depth():
    """With every depth valid, w[t,h] − w[t,h+1] = P[t,h] > 0; a draft's confidence enters the credit of the
    depths before it and the chain of those after it, and never head 0's weight."""
    g = torch.Generator().manual_seed(5)
    ce = torch.rand(2, 5, 5, generator=g) * 3
    labels = torch.full((2, 5, 5), 5)
    base = dpace_weights(ce, labels, 0.5)
    assert (base[..., 1:].diff(dim=-1) < 0).all()
    ce[..., 2] = ce[..., 2] / 4
    better = dpace_weights(ce, labels, 0.5)
    assert (better[..., 1:] > base[..., 1:]).all() and torch.equal(better[..., 0], base[..., 0])


# ------------------------------------------------------------------------------------------------ the model
def scheme(alpha: float = 0.5, scoring: str = "in_forward", model=None) -> DPaceWeighting:
    def model_ce(b: StepBatch) -> torch.Tensor:
        with torch.no_grad():
            return model(b.input_ids, b.attention_mask, MTPLoss(b.labels, chunk_size=5)).ce

    return DPaceWeighting(DPaceSettings(alpha=alpha, scoring=scoring), model_ce, ONE, chunk_size=5)


def model_case(make, head_type: str, n: int = 4):
    model = MTPModel.from_base(make(0), n_heads=n, head_type=head_type)
    perturb_heads(model)
    x, mask = batch(2)
    labels = mtp_labels(x, n, attention_mask=mask)
    return model, x, mask, labels, StepBatch(x, mask, labels, torch.arange(x.shape[0]))


def plain_ce(model, x, mask, labels) -> torch.Tensor:
    """Each pair's CE from a separate forward with materialised logits [B, S, n, V]."""
    with torch.no_grad():
        logits = model(x, mask, return_logits=True).logits
    vocab = logits.shape[-1]
    return F.cross_entropy(logits.float().reshape(-1, vocab), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="none").view(labels.shape)


@pytest.mark.parametrize(("make", "head_type"), [(tiny_llama, "transformer"), (tiny_llama, "linear"),
                                                 (tiny_llama, "sequential"), (tiny_gpt2, "transformer")])
def test_one_forward_weights_equal_the_reference_from_a_separate_forward(make, head_type):
    model, x, mask, labels, step = model_case(make, head_type)
    dpace = scheme(0.4, model=model)
    assert dpace.step_weights([step]) == [None]
    out = model(x, mask, MTPLoss(labels, weights_fn=dpace.weights_in_forward(0, step), chunk_size=5))
    expected = reference_weights(plain_ce(model, x, mask, labels), labels, 0.4)
    torch.testing.assert_close(out.weights.double(), expected, rtol=1e-5, atol=1e-6)
    # separate_pass gives the same weights, over one micro-batch or two (no statistics over the step)
    separate = scheme(0.4, "separate_pass", model).step_weights([step, step])
    torch.testing.assert_close(separate[0], out.weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(separate[1], out.weights, rtol=1e-5, atol=1e-6)
    metrics = dpace.metrics()
    valid = labels != IGNORE_INDEX
    assert metrics["dpace/weight_mean_head0"] == 1.0
    assert metrics["dpace/weight_mean_head1"] == pytest.approx(float(out.weights[..., 1][valid[..., 1]].mean()))


@pytest.mark.parametrize("head_type", ["transformer", "sequential"])
@pytest.mark.parametrize("reduction", ["token_mean", "weight_mean"])
def test_the_weighted_loss_and_its_gradient_are_those_of_a_plain_weighted_ce(head_type, reduction):
    model, x, mask, labels, step = model_case(tiny_llama, head_type)
    (weights,) = scheme(0.5, "separate_pass", model).step_weights([step])
    assert not weights.requires_grad
    fast, ref, fast_grads, ref_grads = fast_and_reference(model, x, mask, labels, weights, [1.0, 0.5, 0.5, 0.5],
                                                          reduction)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    assert fast_grads.keys() == ref_grads.keys() and fast_grads
    for name in ref_grads:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # and it is not the uniform loss: the weights change the gradient
    uniform = fast_and_reference(model, x, mask, labels, None, [1.0, 0.5, 0.5, 0.5], reduction)[2]
    assert any(not torch.allclose(uniform[k], fast_grads[k], atol=1e-6) for k in uniform)


def test_in_forward_gradient_equals_the_plain_weighted_ce_with_its_own_weights():
    """The one-forward mode: the weights made inside the forward are constants of the loss, so the gradient is
    that of the plain weighted CE with those weights."""
    model, x, mask, labels, step = model_case(tiny_llama, "transformer")
    dpace = scheme(0.5, model=model)
    out = model(x, mask, MTPLoss(labels, weights_fn=dpace.weights_in_forward(0, step), chunk_size=5))
    out.loss.backward()
    inside = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    _, _, _, ref_grads = fast_and_reference(model, x, mask, labels, out.weights, None, "token_mean")
    for name in ref_grads:
        torch.testing.assert_close(inside[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------------ settings
@pytest.mark.parametrize(("section", "message"), [
    ("dpace:\n  alpha: 1.5\n", "dpace.alpha: "),
    ("dpace:\n  alpha: -0.1\n", "dpace.alpha: "),
    ("dpace:\n  alpha: lots\n", "dpace.alpha: "),
    ("dpace:\n  scoring: later\n", "dpace.scoring: "),
    ("dpace:\n  beta: 1\n", "dpace.beta: "),
])
def test_a_bad_dpace_key_is_a_one_line_error_naming_file_and_key(tmp_path, section, message):
    path = tmp_path / "r.yaml"
    path.write_text("algorithm: dpace\n" + section + "data:\n  train:\n    - kind: mbpp\ntrain:\n  max_steps: 1\n")
    with pytest.raises(ConfigError) as error:
        scheme_settings(load_recipe(path))
    assert str(error.value).startswith(f"{path}: {message}") and "\n" not in str(error.value)


def test_the_section_is_optional_and_belongs_to_dpace(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("algorithm: dpace\ndata:\n  train:\n    - kind: mbpp\ntrain:\n  max_steps: 1\n")
    assert scheme_settings(load_recipe(path)).dpace == DPaceSettings()
    path.write_text("dpace:\n  alpha: 0.5\ndata:\n  train:\n    - kind: mbpp\ntrain:\n  max_steps: 1\n")
    with pytest.raises(ConfigError, match="the `dpace` section goes with algorithm: dpace, not baseline-mtp"):
        scheme_settings(load_recipe(path))


# ------------------------------------------------------------------------------------------------ training
def test_training_with_the_recipe_logs_weight_statistics_and_histograms(tmp_path, capsys):
    from mlflow import MlflowClient

    recipe = {"algorithm": "dpace", "dpace": RECIPE["dpace"], "train": {"max_steps": 3, "grad_accum_steps": 2}}
    assert main(train_args(tmp_path, "dpace", recipe=recipe, config={"mlflow": {"enabled": True}})) == 0
    assert "finished at step 3/3" in capsys.readouterr().out
    run_dir = tmp_path / "runs" / "dpace"
    histogram = json.loads((run_dir / "dpace_weight_histogram.json").read_text())
    assert len(histogram["counts_per_head"]) == 3 and sum(histogram["counts_per_head"][2]) > 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    metrics = run.data.metrics
    assert metrics["dpace/weight_mean_head0"] == 1.0 and metrics["dpace/weight_std_head0"] == 0.0
    # n = 3: depth 1 weighs q̃1·(1 + q̃2) ∈ (α, 2], depth 2 weighs q̃1·q̃2 ∈ (α², 1], with α = 0.5
    assert 0.5 < metrics["dpace/weight_mean_head1"] < 2.0 and metrics["dpace/weight_max_head1"] <= 2.0
    assert 0.25 < metrics["dpace/weight_mean_head2"] < metrics["dpace/weight_mean_head1"]
    assert metrics["dpace/weight_max_head2"] <= 1.0
    history = client.get_metric_history(run.info.run_id, "dpace/weight_mean_head1")
    assert [m.step for m in history] == [1, 2, 3]
