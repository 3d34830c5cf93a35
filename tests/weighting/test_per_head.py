"""The one per-head weight transform the schemes share (wmtp.weighting.per_head), held to a plain loop on random
inputs: per head over the step's valid pairs, in step order, on one process and on two ranks; and what a scheme
keeps of it (PerHeadRecord)."""

from __future__ import annotations

import json
import math
import socket

import pytest
import torch

from wmtp import IGNORE_INDEX, mtp_labels
from wmtp.loss import mean1_clip
from wmtp.runtime.distributed import DistInfo
from wmtp.weighting.base import StepBatch, WeightingScheme
from wmtp.weighting.hybrid import HybridSettings, HybridWeighting
from wmtp.weighting.per_head import HISTOGRAM_BINS, HISTOGRAM_MAX, PerHeadRecord, exp_weights, per_head_weights

CPU = DistInfo(0, 1, 0, torch.device("cpu"))
STATS = ("selected_frac", "zero_frac", "weight_mean", "weight_std", "weight_max", "weight_entropy")


def step(seed: int, n_heads: int = 3, micro_batches: int = 3) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Signals [3, 14, n] and valid masks of one step's micro-batches, with padding and targets past the end."""
    g = torch.Generator().manual_seed(seed)
    labels = [mtp_labels(torch.randint(0, 9, (3, 14), generator=g), n_heads,
                         attention_mask=(torch.arange(14) < 10 + k).long().expand(3, 14)) for k in range(micro_batches)]
    return [torch.randn(lab.shape, generator=g) for lab in labels], [lab != IGNORE_INDEX for lab in labels]


def plain_exp(values: torch.Tensor, temperature: float, eps: float, w_max: float, sign: float = 1.0,
              capped: torch.Tensor | None = None) -> torch.Tensor:
    """exp(±z/T) in float64 without any shift (fine at these temperatures), capped at 1 where asked, mean1_clip."""
    v = values.double()
    z = (v - v.mean()) / v.std(unbiased=False)
    raw = torch.exp(sign * z / temperature)
    if capped is not None:
        raw = torch.where(capped, raw.clamp(max=1.0), raw)
    return mean1_clip(raw, torch.ones_like(raw, dtype=torch.bool), eps=eps, w_max=w_max)


def plain_per_head(signals: list[torch.Tensor], valid: list[torch.Tensor], rule) -> tuple[list[torch.Tensor], dict]:
    """Per head, the valid values one by one in step order (micro-batch, row, position), the rule, written back."""
    weights = [torch.zeros(s.shape) for s in signals]
    metrics = {}
    for h in range(signals[0].shape[-1]):
        places = [(k, b, t) for k, v in enumerate(valid) for b in range(v.shape[0]) for t in range(v.shape[1])
                  if v[b, t, h]]
        if not places:
            continue
        head_w, signal = rule(h, torch.stack([signals[k][b, t, h] for k, b, t in places]))
        for (k, b, t), w in zip(places, head_w.tolist(), strict=True):
            weights[k][b, t, h] = w
        metrics.update({f"test/{name}_head{h}": value for name, value in signal.items()})
        p = head_w.double() / head_w.double().sum()
        metrics.update({f"test/selected_frac_head{h}": sum(w > 0 for w in head_w.tolist()) / len(places),
                        f"test/zero_frac_head{h}": sum(w == 0 for w in head_w.tolist()) / len(places),
                        f"test/weight_mean_head{h}": float(head_w.double().mean()),
                        f"test/weight_std_head{h}": float(head_w.double().std(unbiased=False)),
                        f"test/weight_max_head{h}": float(head_w.max()),
                        f"test/weight_entropy_head{h}": float(-(p * p.log()).sum()) / math.log(len(places))})
    return weights, metrics


def exp_rule(temperature: float = 0.7, eps: float = 0.05, w_max: float = 3.0):
    def rule(h: int, values: torch.Tensor):
        mean, std = values.mean(), values.std(unbiased=False)
        return (exp_weights(values, mean, std, temperature=temperature, eps=eps, w_max=w_max),
                {"signal_mean": float(mean)})
    return rule


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("temperature", "sign"), [(0.7, 1.0), (2.0, 1.0), (0.5, -1.0)])
def test_exp_weights_match_a_plain_computation(seed, temperature, sign):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(200, generator=g) * 3 + 1
    got = exp_weights(values, values.mean(), values.std(unbiased=False), temperature=temperature, eps=0.05,
                      w_max=3.0, sign=sign)
    assert got.dtype == torch.float32 and got.shape == (200,)
    torch.testing.assert_close(got, plain_exp(values, temperature, 0.05, 3.0, sign), rtol=1e-6, atol=1e-7)
    assert float(got.double().mean()) == pytest.approx(1.0, abs=1e-6) and got.min() >= 0.05 and got.max() <= 3.0


def test_exp_weights_cap_the_marked_values_at_the_weight_of_an_average_one():
    values = torch.linspace(-3, 3, 101)
    capped = values < 1.0
    got = exp_weights(values, values.mean(), values.std(unbiased=False), temperature=0.5, eps=0.0, w_max=50.0,
                      capped=capped)
    torch.testing.assert_close(got, plain_exp(values, 0.5, 0.0, 50.0, capped=capped), rtol=1e-6, atol=1e-7)
    # the values in [0, 1) sit above the mean, so the cap lowers them to the weight of the mean
    assert torch.equal(got[(values >= 0) & capped], got[50].expand(int(((values >= 0) & capped).sum())))


def test_exp_weights_stay_finite_for_a_dominant_value_at_low_temperature():
    """z/T far beyond fp32's exp: finite, mean 1, the dominant value at w_max, the equal others share one weight."""
    values = torch.zeros(60)
    values[7] = 1e4
    got = exp_weights(values, values.mean(), values.std(unbiased=False), temperature=0.05, eps=0.05, w_max=3.0)
    assert torch.isfinite(got).all() and float(got.double().mean()) == pytest.approx(1.0, abs=1e-6)
    assert got[7] == 3.0 and (got[torch.arange(60) != 7] == got[0]).all()


def test_exp_weights_of_equal_values_are_one():
    values = torch.full((9,), 2.5)
    got = exp_weights(values, values.mean(), values.std(unbiased=False), temperature=0.7, eps=0.05, w_max=3.0)
    assert torch.equal(got, torch.ones(9))


@pytest.mark.parametrize("seed", range(3))
def test_per_head_weights_match_a_plain_loop(seed):
    signals, valid = step(seed)
    got = per_head_weights(signals, valid, exp_rule(), CPU, prefix="test", stats=STATS)
    want_weights, want_metrics = plain_per_head(signals, valid, exp_rule())
    for w, want, v in zip(got.weights, want_weights, valid, strict=True):
        assert w.dtype == torch.float32 and w.shape == v.shape
        torch.testing.assert_close(w, want, rtol=0, atol=0)  # the same values, written where they came from
        assert (w[~v] == 0).all()
    assert list(got.metrics) == list(want_metrics)
    assert got.metrics == pytest.approx(want_metrics, rel=1e-6, abs=1e-9)
    for h in range(3):
        head = torch.cat([w[..., h][v[..., h]] for w, v in zip(got.weights, valid, strict=True)])
        assert torch.equal(got.histograms[h], torch.histc(head, bins=HISTOGRAM_BINS, min=0.0, max=HISTOGRAM_MAX))
    assert got.histograms.shape == (3, HISTOGRAM_BINS) and got.histograms.device.type == "cpu"


def test_the_rule_sees_each_head_alone_and_metrics_are_only_of_what_it_chose():
    """A selection rule (keep the values above 0): selected and zero fractions, mean, std and max of its 0/1."""
    signals, valid = step(4)
    seen = []

    def keep_positive(h: int, values: torch.Tensor):
        seen.append((h, values.numel()))
        return (values > 0).float(), {}

    got = per_head_weights(signals, valid, keep_positive, CPU, prefix="sel", stats=("selected_frac", "zero_frac"))
    assert seen == [(h, sum(int(v[..., h].sum()) for v in valid)) for h in range(3)]
    for h in range(3):
        values = torch.cat([s[..., h][v[..., h]] for s, v in zip(signals, valid, strict=True)])
        assert got.metrics[f"sel/selected_frac_head{h}"] == pytest.approx(float((values > 0).float().mean()))
        assert got.metrics[f"sel/zero_frac_head{h}"] == pytest.approx(float((values <= 0).float().mean()))
    assert set(got.metrics) == {f"sel/{k}_head{h}" for k in ("selected_frac", "zero_frac") for h in range(3)}


def test_a_head_without_valid_pairs_is_zero_without_metrics_and_the_rule_is_not_called():
    signals, valid = step(5)
    for v in valid:
        v[..., 1] = False
    calls = []

    def rule(h: int, values: torch.Tensor):
        calls.append(h)
        return torch.ones_like(values), {"signal_mean": float(values.mean())}

    got = per_head_weights(signals, valid, rule, CPU, prefix="test", stats=("weight_mean",))
    assert calls == [0, 2]
    assert all((w[..., 1] == 0).all() for w in got.weights)
    assert not [k for k in got.metrics if k.endswith("_head1")]
    assert torch.equal(got.histograms[1], torch.zeros(HISTOGRAM_BINS))


def test_an_unknown_statistic_is_refused():
    signals, valid = step(6)
    with pytest.raises(ValueError, match="weight_median"):
        per_head_weights(signals, valid, exp_rule(), CPU, prefix="test", stats=("weight_median",))


def _rank_weights(rank: int, world: int, port: int, signals: list, valid: list, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        info = DistInfo(rank, world, rank, torch.device("cpu"))
        mine = slice(rank * 2, rank * 2 + 2)
        got = per_head_weights([s[mine] for s in signals], [v[mine] for v in valid], exp_rule(), info,
                               prefix="test", stats=STATS)
        torch.save((got.weights, got.metrics, got.histograms), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_give_the_weights_of_one_process(tmp_path):
    """Rank r holds rows 2r, 2r+1 of each micro-batch; one process holding the micro-batches of rank 0, then those
    of rank 1 (the gather's order: rank, micro-batch, row, position) gives the same weights, metrics, histograms."""
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(7)
    labels = [mtp_labels(torch.randint(0, 9, (4, 12), generator=g), 3) for _ in range(2)]
    signals = [torch.randn(lab.shape, generator=g) for lab in labels]
    valid = [lab != IGNORE_INDEX for lab in labels]
    single = per_head_weights([s[:2] for s in signals] + [s[2:] for s in signals],
                              [v[:2] for v in valid] + [v[2:] for v in valid], exp_rule(), CPU, prefix="test",
                              stats=STATS)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_rank_weights, args=(2, port, signals, valid, str(tmp_path)), nprocs=2, start_method="spawn")
    (w0, metrics0, hist0), (w1, metrics1, hist1) = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for k in range(2):
        assert torch.equal(w0[k], single.weights[k]) and torch.equal(w1[k], single.weights[2 + k])
    assert metrics0 == metrics1 == single.metrics
    assert torch.equal(hist0, single.histograms) and torch.equal(hist1, single.histograms)


def test_a_record_keeps_the_step_or_the_mean_over_its_micro_batches_and_sums_histograms():
    """Metrics of the step (per_micro_batch: their mean over its micro-batches), histograms of the step (the sum
    over its micro-batches, TensorBoard's, by head) and of the run (the file)."""
    one, two = torch.ones(2, HISTOGRAM_BINS), torch.full((2, HISTOGRAM_BINS), 2.0)
    whole = PerHeadRecord("test")
    whole.add({"a": 1.0, "b": 2.0}, one)
    whole.add({"a": 3.0}, two)
    assert whole.metrics == {"a": 3.0} and torch.equal(whole.histogram, one + two)
    edges = [HISTOGRAM_MAX * i / HISTOGRAM_BINS for i in range(HISTOGRAM_BINS + 1)]
    step = whole.histograms()
    assert list(step) == ["test/weights_head0", "test/weights_head1"]
    assert all(h.counts == two[0].tolist() and h.bin_edges == pytest.approx(edges) for h in step.values())
    per_micro_batch = PerHeadRecord("test", per_micro_batch=True)
    for metrics in ({"a": 1.0, "b": 2.0}, {"a": 2.0, "b": 4.0}, {"a": 6.0, "b": 0.0}):
        per_micro_batch.add(metrics, one)
    assert per_micro_batch.metrics == pytest.approx({"a": 3.0, "b": 2.0})
    assert per_micro_batch.histograms()["test/weights_head1"].counts == (3 * one[1]).tolist()
    per_micro_batch.new_step()
    per_micro_batch.add({"a": 5.0}, one)
    assert per_micro_batch.metrics == {"a": 5.0} and torch.equal(per_micro_batch.histogram, 4 * one)
    assert per_micro_batch.histograms()["test/weights_head1"].counts == one[1].tolist()
    (name, text), = per_micro_batch.artifacts().items()
    saved = json.loads(text)
    assert name == "test_weight_histogram.json" and saved["counts_per_head"] == (4 * one).tolist()
    assert saved["bin_edges"] == pytest.approx([HISTOGRAM_MAX * i / HISTOGRAM_BINS for i in range(HISTOGRAM_BINS + 1)])
    assert PerHeadRecord("unused").artifacts() == {} and PerHeadRecord("unused").histograms() == {}


class FixedWeights(WeightingScheme):
    """A hybrid component that hands over given weights."""

    def __init__(self, weights: list[list[torch.Tensor]]) -> None:
        self.steps = iter(weights)

    def step_weights(self, batches: list[StepBatch]) -> list[torch.Tensor | None]:
        return next(self.steps)


def test_a_hybrid_reports_no_metric_of_a_head_without_pairs_in_that_step():
    """Step 2 has no valid pair on head 2: its hybrid metrics are gone, not step 1's numbers."""
    signals, valid = step(8)
    second = [v.clone() for v in valid]
    for v in second:
        v[..., 2] = False

    def batches(masks: list[torch.Tensor]) -> list[StepBatch]:
        labels = [torch.where(v, 1, IGNORE_INDEX) for v in masks]
        return [StepBatch(lab[..., 0], torch.ones_like(lab[..., 0]), lab, torch.arange(3)) for lab in labels]

    steps = [[s.abs() * v for s, v in zip(signals, masks, strict=True)] for masks in (valid, second)]
    hybrid = HybridWeighting(HybridSettings(components=["gradnorm"]), [("gradnorm", FixedWeights(steps))], CPU)
    hybrid.step_weights(batches(valid))
    assert "hybrid/weight_max_head2" in hybrid.metrics()
    hybrid.step_weights(batches(second))
    assert "hybrid/weight_max_head1" in hybrid.metrics()
    assert not [k for k in hybrid.metrics() if k.endswith("_head2")]
    histograms = hybrid.histograms()  # of step 2: empty on head 2 (TensorBoard leaves an empty one out)
    assert sorted(histograms) == [f"hybrid/weights_head{h}" for h in range(3)]
    assert sum(histograms["hybrid/weights_head2"].counts) == 0 < sum(histograms["hybrid/weights_head1"].counts)
