"""Hybrid weighting: the combination against a plain reference on random weights, a hybrid of one component equal
to that component, two ranks equal to one process, the recipe's checks, and a real run of rho1 × gradnorm."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from helpers.tiny_run import RECIPE, merge, train_args

from wmtp import IGNORE_INDEX, mtp_labels
from wmtp.cli import main
from wmtp.config import ConfigError, Recipe
from wmtp.runtime.distributed import DistInfo
from wmtp.weighting import scheme_settings
from wmtp.weighting.base import StepBatch, WeightingScheme
from wmtp.weighting.hybrid import HybridSettings, HybridWeighting

ONE = DistInfo(0, 1, 0, torch.device("cpu"))


class Fixed(WeightingScheme):
    """A component that returns given weights (None: uniform)."""

    def __init__(self, weights: list[torch.Tensor | None]) -> None:
        self.weights = weights

    def step_weights(self, batches):
        return [None if w is None else w.clone() for w in self.weights]


def reference_mean1_clip(values: torch.Tensor, eps: float, w_max: float) -> torch.Tensor:
    """Plain bisection on the scale s with mean(clip(s·w, eps, w_max)) = 1, in float64."""
    v = values.double()
    if v.numel() == 0:
        return v.float()
    if float(v.max()) <= 0:
        return torch.ones_like(v).float()  # no information: every pair weighs 1
    lo, hi = 0.0, 1.0
    while float(torch.clamp(hi * v, eps, w_max).mean()) < 1 and hi < 1e30:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float(torch.clamp(mid * v, eps, w_max).mean()) < 1 else (lo, mid)
    return torch.clamp(hi * v, eps, w_max).float()


def reference_hybrid(components: list[list[torch.Tensor | None]], labels: list[torch.Tensor], combine: str,
                     alphas: list[float], eps: float, w_max: float) -> list[torch.Tensor]:
    """Loops over heads on the concatenated valid values: normalise each component to mean 1, combine, clip."""
    valid = [lab != IGNORE_INDEX for lab in labels]
    out = [torch.zeros(lab.shape) for lab in labels]
    for h in range(labels[0].shape[-1]):
        mask = [v[..., h] for v in valid]
        combined = None
        for weights, alpha in zip(components, alphas, strict=True):
            vals = torch.cat([(torch.ones(m.shape) if w is None else w[..., h])[m]
                              for w, m in zip(weights, mask, strict=True)])
            vals = vals / vals.mean() if float(vals.mean()) > 0 else vals
            if combined is None:
                combined = alpha * vals if combine == "mixture" else vals
            else:
                combined = combined * vals if combine == "product" else combined + alpha * vals
        clipped = reference_mean1_clip(combined, eps, w_max)
        start = 0
        for o, m in zip(out, mask, strict=True):
            k = int(m.sum())
            o[..., h][m] = clipped[start:start + k]
            start += k
    return out


def random_step(seed: int, micro_batches: int = 2, rows: int = 4, seq: int = 10, heads: int = 3):
    g = torch.Generator().manual_seed(seed)
    labels = [mtp_labels(torch.randint(0, 50, (rows, seq), generator=g), heads) for _ in range(micro_batches)]
    batches = [StepBatch(lab[..., 0].clamp_min(0), torch.ones(rows, seq, dtype=torch.long), lab, torch.arange(rows))
               for lab in labels]

    def lognormal(sigma: float) -> list[torch.Tensor]:
        return [torch.exp(torch.randn(lab.shape, generator=g) * sigma) * (lab != IGNORE_INDEX) for lab in labels]

    return labels, batches, lognormal


@pytest.mark.parametrize("combine", ["product", "mixture"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hybrid_weights_equal_the_plain_reference(combine, seed):
    labels, batches, lognormal = random_step(seed)
    components = [lognormal(1.5), lognormal(0.5), [None, None]]  # heavy-tailed, mild, uniform
    alphas = [0.5, 0.3, 0.2]
    settings = HybridSettings(components=["rho1", "gradnorm", "baseline-mtp"], combine=combine, eps=0.05, w_max=3.0,
                              **({"mixture_weights": [5.0, 3.0, 2.0]} if combine == "mixture" else {}))
    fixed = [(n, Fixed(w)) for n, w in zip(settings.components, components, strict=True)]
    scheme = HybridWeighting(settings, fixed, ONE)
    got = scheme.step_weights(batches)
    want = reference_hybrid(components, labels, combine, alphas, 0.05, 3.0)
    for g_, w_, lab in zip(got, want, labels, strict=True):
        assert not g_.requires_grad
        assert torch.allclose(g_, w_, atol=1e-5), (g_ - w_).abs().max()
        valid = lab != IGNORE_INDEX
        assert torch.equal(g_[~valid], torch.zeros_like(g_[~valid]))
    for h in range(3):  # mean 1 and the bounds, per head over the step
        vals = torch.cat([g_[..., h][lab[..., h] != IGNORE_INDEX] for g_, lab in zip(got, labels, strict=True)])
        assert float(vals.mean()) == pytest.approx(1.0, abs=1e-5)
        assert float(vals.min()) >= 0.05 - 1e-6 and float(vals.max()) <= 3.0 + 1e-6


def test_a_selection_component_keeps_its_zeros_with_eps_0():
    labels, batches, lognormal = random_step(3)
    keep = [(torch.rand(lab.shape, generator=torch.Generator().manual_seed(9)) < 0.6).float()
            * (lab != IGNORE_INDEX) for lab in labels]
    settings = HybridSettings(components=["rho1", "gradnorm"], eps=0.0, w_max=10.0)
    got = HybridWeighting(settings, [("rho1", Fixed(keep)), ("gradnorm", Fixed(lognormal(0.3)))], ONE)
    for g_, k, lab in zip(got.step_weights(batches), keep, labels, strict=True):
        dropped = (k == 0) & (lab != IGNORE_INDEX)
        assert dropped.any() and torch.equal(g_[dropped], torch.zeros_like(g_[dropped]))


def test_one_component_gives_that_components_weights():
    labels, batches, lognormal = random_step(4)
    from wmtp.loss import mean1_clip

    raw = lognormal(1.0)
    # what a weighted scheme hands over: already mean1_clip-ed per head over the step
    valid = [lab != IGNORE_INDEX for lab in labels]
    clipped = [torch.zeros_like(w) for w in raw]
    for h in range(3):
        vals = torch.cat([w[..., h][v[..., h]] for w, v in zip(raw, valid, strict=True)])
        out = mean1_clip(vals, torch.ones_like(vals, dtype=torch.bool), eps=0.05, w_max=3.0)
        start = 0
        for c, v in zip(clipped, valid, strict=True):
            k = int(v[..., h].sum())
            c[..., h][v[..., h]] = out[start:start + k]
            start += k
    scheme = HybridWeighting(HybridSettings(components=["rho1"]), [("rho1", Fixed(clipped))], ONE)
    for g_, c in zip(scheme.step_weights(batches), clipped, strict=True):
        assert torch.allclose(g_, c, atol=1e-6)


def _rank_weights(rank: int, world: int, port: int, components, labels, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        info = DistInfo(rank, world, rank, torch.device("cpu"))
        mine = slice(rank * 2, rank * 2 + 2)
        batches = [StepBatch(lab[mine, :, 0].clamp_min(0), torch.ones(2, lab.shape[1], dtype=torch.long), lab[mine],
                             torch.arange(2)) for lab in labels]
        settings = HybridSettings(components=["rho1", "gradnorm"], combine="product")
        scheme = HybridWeighting(settings, [(n, Fixed([w[mine] for w in ws]))
                                            for n, ws in zip(settings.components, components, strict=True)], info)
        torch.save(scheme.step_weights(batches), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_combine_like_one_process(tmp_path):
    """Normalisation and clipping run over all ranks: 2 ranks with half the sequences each give the weights one
    process gives for the whole step (in rank-major order)."""
    import torch.multiprocessing as mp

    labels, _, lognormal = random_step(5)
    components = [lognormal(1.5), lognormal(0.7)]
    order = [(k, s) for s in (slice(0, 2), slice(2, 4)) for k in range(2)]  # rank 0's rows, then rank 1's
    single_labels = [labels[k][s] for k, s in order]
    single = reference_hybrid([[ws[k][s] for k, s in order] for ws in components], single_labels, "product",
                              [0.5, 0.5], 0.05, 3.0)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_rank_weights, args=(2, port, components, labels, str(tmp_path)), nprocs=2,
                       start_method="spawn")
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for k in range(2):
        assert torch.allclose(rank0[k], single[k], atol=1e-5)
        assert torch.allclose(rank1[k], single[2 + k], atol=1e-5)


def recipe_with(**sections) -> Recipe:
    recipe = Recipe.model_validate(merge(RECIPE, {"algorithm": "hybrid", **sections}))
    return recipe


@pytest.mark.parametrize(("sections", "message"), [
    ({"hybrid": {"components": ["gradnorm", "nope"]}}, "unknown scheme `nope`"),
    ({"hybrid": {"components": ["hybrid"]}}, "cannot be part of a hybrid"),
    ({"hybrid": {"components": ["rho1"]}}, "component `rho1` needs its `rho1` section"),
    ({"hybrid": {"components": ["gradnorm"]}, "rho1": {"mode": "topk"}}, "the `rho1` section belongs to no "
     "component"),
    ({"hybrid": {"components": ["gradnorm", "rho1"], "combine": "mixture", "mixture_weights": [1.0]},
      "rho1": {"mode": "topk"}}, "mixture_weights has 1 values for 2 components"),
    ({"hybrid": {"components": ["gradnorm"]}, "gradnorm": {"temperature": -1}}, "gradnorm.temperature"),
    ({"hybrid": {"components": ["gradnorm", "gradnorm"]}}, "listed twice"),
    ({"hybrid": {"components": ["gradnorm"]}, "gradnorm": {"scoring": "in_forward"}}, "`gradnorm.scoring: "
     "in_forward` cannot be part of a hybrid"),
    # dpace scores in_forward by default: refused without its section too, and accepted with separate_pass
    ({"hybrid": {"components": ["dpace", "gradnorm"]}}, "`dpace.scoring: in_forward` cannot be part of a hybrid"),
])
def test_the_recipe_is_checked_with_each_components_own_settings(sections, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        scheme_settings(recipe_with(**sections))


def test_dpace_with_separate_pass_is_a_component():
    settings = scheme_settings(recipe_with(hybrid={"components": ["dpace", "gradnorm"]},
                                           dpace={"scoring": "separate_pass"}))
    assert [name for name, _ in settings.components] == ["dpace", "gradnorm"]


def test_a_run_of_rho1_times_gradnorm_logs_every_components_metrics(tmp_path, capsys):
    assert main(train_args(tmp_path, "reference", recipe={"mtp": {"n_heads": 1}, "train": {"max_steps": 3}})) == 0
    reference = str(tmp_path / "runs" / "reference" / "final")
    recipe = {"algorithm": "hybrid", "hybrid": {"components": ["rho1", "gradnorm"], "combine": "product"},
              "rho1": {"mode": "weighted"}, "gradnorm": {"direction": "down"}, "train": {"max_steps": 3}}
    config = {"reference_model": {"path": reference}, "mlflow": {"enabled": True}}
    assert main(train_args(tmp_path, "hybrid", config=config, recipe=recipe)) == 0
    assert "finished at step 3/3" in capsys.readouterr().out
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{(tmp_path / 'runs' / 'mlflow.db').resolve()}")
    (run,) = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
              if r.info.run_name == "hybrid"]
    metrics = set(run.data.metrics)
    assert {"hybrid/weight_max_head1", "rho1/excess_mean_head1", "gradnorm/signal_mean_head1"} <= metrics
    histogram = json.loads((tmp_path / "runs" / "hybrid" / "hybrid_weight_histogram.json").read_text())
    assert len(histogram["counts_per_head"]) == 3
    assert (tmp_path / "runs" / "hybrid" / "rho1_weight_histogram.json").is_file()
