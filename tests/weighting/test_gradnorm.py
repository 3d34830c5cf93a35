"""Gradient-norm weighting (docs/method.md §5.4): the closed form ‖p − e_y‖² against autograd, its chunked path,
the per-head weights against a plain computation, two ranks against one process, and real training runs."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers.models import tiny_gpt2, tiny_llama
from helpers.tiny_run import files, final_weights, train_args

from wmtp import IGNORE_INDEX, GradNormScores, MTPModel, mean1_clip, mtp_labels
from wmtp.cli import main
from wmtp.loss import fused_linear_grad_norm_sq, logit_grad_norm_sq
from wmtp.runtime.distributed import DistInfo
from wmtp.weighting.gradnorm import GradNormSettings, gradnorm_weights

ONE = DistInfo(0, 1, 0, torch.device("cpu"))
RECIPE = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "recipes/gradnorm/mbpp.yaml").read_text())


def autograd_grad_norm_sq(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """‖∂CE/∂logits‖² per row by autograd, in float64 on the given (possibly rounded) logits."""
    x = logits.detach().double().requires_grad_(True)
    ce = torch.nn.functional.cross_entropy(x, targets, reduction="sum")  # rows are independent: row i's gradient
    (grad,) = torch.autograd.grad(ce, x)
    return grad.pow(2).sum(dim=-1)


def hard_logits(rows: int, vocab: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits with the hard cases: a confidently right row (p_y → 1), a confidently wrong one, huge
    logits, a flat row."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, vocab, (rows,), generator=g)
    logits[0, targets[0]] = 40.0  # right, p_y = 1 − ~1e-14
    logits[1, (targets[1] + 1) % vocab] = 40.0  # wrong, g² → 2
    logits[2] *= 1e3  # huge logits: no overflow
    logits[3] = 0.0  # flat: g² = 1 − 1/V
    return logits.to(dtype), targets


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_closed_form_equals_autograd(dtype):
    logits, targets = hard_logits(12, 37, dtype, seed=0)
    got = logit_grad_norm_sq(logits, targets)
    want = autograd_grad_norm_sq(logits, targets)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert got[1] > 1.99 and abs(float(got[3]) - (1 - 1 / 37)) < 1e-6
    # a nearly-right row (1 − p_y ≈ 4e-6, g² ≈ 1.7e-11): Σp² − 2·p_y + 1 summed as written cancels to 0 in fp32;
    # the split form Σ_{i≠y} p_i² + (1 − p_y)² keeps it to 1e-5
    logits = torch.zeros(1, 37)
    logits[0, 5] = 16.0
    p = torch.softmax(logits, dim=-1)
    assert float((p * p).sum() - 2 * p[0, 5] + 1) == 0.0
    torch.testing.assert_close(logit_grad_norm_sq(logits, torch.tensor([5])).double(),
                               autograd_grad_norm_sq(logits, torch.tensor([5])), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_closed_form_with_a_150k_vocabulary(dtype):
    logits, targets = hard_logits(4, 150_000, dtype, seed=1)
    got = logit_grad_norm_sq(logits, targets)
    torch.testing.assert_close(got.double(), autograd_grad_norm_sq(logits, targets), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(got).all() and bool(((got >= 0) & (got <= 2)).all())


def fused_case(seed: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    B, S, n, D, V = 2, 9, 3, 8, 29
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 6:] = 0
    labels = mtp_labels(torch.randint(0, V, (B, S), generator=g), n, attention_mask=mask)
    hidden = [(torch.randn(B, S, D, generator=g) * 2).to(dtype) for _ in range(n)]
    U = torch.randn(V, D, generator=g)
    bias = torch.randn(V, generator=g)
    return hidden, U, bias, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_equals_unchunked(dtype):
    hidden, U, bias, labels = fused_case(2, dtype)
    valid = labels != IGNORE_INDEX
    logits = torch.stack([torch.nn.functional.linear(h, U.to(dtype), bias.to(dtype)) for h in hidden], dim=2)
    whole = logit_grad_norm_sq(logits[valid], labels[valid])  # every valid pair at once
    for chunk in (1, 5, 4096):
        got = fused_linear_grad_norm_sq(hidden, U, labels, bias=bias, chunk_size=chunk)
        torch.testing.assert_close(got[valid], whole, rtol=1e-6, atol=1e-7)
        assert (got[~valid] == 0).all() and got.dtype == torch.float32
    torch.testing.assert_close(whole.double(), autograd_grad_norm_sq(logits[valid], labels[valid]), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize(("make", "head_type"), [(tiny_llama, "transformer"), (tiny_llama, "linear"),
                                                 (tiny_gpt2, "transformer")])
def test_model_forward_scores_each_pair_without_gradient(make, head_type):
    model = MTPModel.from_base(make(0), n_heads=3, head_type=head_type)
    with torch.no_grad():  # the heads start as copies of the last layer: make them differ
        for p in model.heads.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 90, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    labels = mtp_labels(ids, 3, attention_mask=mask)
    out = model(ids, mask, GradNormScores(labels, chunk_size=7))  # grad mode on: still no graph
    assert out.loss is None and not out.grad_norm_sq.requires_grad
    logits = model(ids, mask, return_logits=True).logits
    valid = labels != IGNORE_INDEX
    torch.testing.assert_close(out.grad_norm_sq[valid].double(),
                               autograd_grad_norm_sq(logits[valid], labels[valid]), rtol=1e-5, atol=1e-6)
    assert (out.grad_norm_sq[~valid] == 0).all()


# ------------------------------------------------------------------------------------------------ the weights
def step_case(seed: int, micro_batches: int = 2, rows: int = 4):
    g = torch.Generator().manual_seed(seed)
    labels = []
    for _ in range(micro_batches):
        mask = torch.ones(rows, 10, dtype=torch.long)
        mask[0, 7:] = 0
        labels.append(mtp_labels(torch.randint(0, 9, (rows, 10), generator=g), 3, attention_mask=mask))
    # heavy-tailed like a real step: most pairs easy, a few hard; head h's signal grows with h
    signals = [torch.rand(lab.shape, generator=g).pow(4) * 1.4 * (1 + torch.arange(3) / 3) for lab in labels]
    return signals, labels


def weights_for(signals, labels, info=ONE, smoothed=None, **settings):
    s = GradNormSettings(**settings)
    return gradnorm_weights(signals, labels, temperature=s.temperature, eps=s.eps, w_max=s.w_max,
                            direction=s.direction, info=info, smoothed=smoothed,
                            ema_decay=s.ema_decay if s.smoothing == "ema" else None)


def head_values(tensors, labels, h):
    return torch.cat([t[..., h][lab[..., h] != IGNORE_INDEX] for t, lab in zip(tensors, labels, strict=True)])


@pytest.mark.parametrize("direction", ["up", "down"])
def test_weights_against_a_plain_computation(direction):
    signals, labels = step_case(5)
    weights, metrics, histograms, used = weights_for(signals, labels, temperature=0.5, eps=0.1, w_max=2.5,
                                                     direction=direction)
    sign = 1 if direction == "up" else -1
    for h in range(3):
        values = head_values(signals, labels, h).double()
        z = (values - values.mean()) / values.std(unbiased=False)
        expected = mean1_clip(torch.exp(sign * z / 0.5), torch.ones_like(z, dtype=torch.bool), eps=0.1, w_max=2.5)
        got = head_values(weights, labels, h)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        assert got.double().mean().item() == pytest.approx(1.0, abs=1e-5)
        assert got.min() >= 0.1 and got.max() <= 2.5
        assert metrics[f"gradnorm/signal_mean_head{h}"] == pytest.approx(float(values.mean()))
        assert metrics[f"gradnorm/signal_std_head{h}"] == pytest.approx(float(values.std(unbiased=False)))
        assert metrics[f"gradnorm/weight_max_head{h}"] == pytest.approx(float(got.max()))
        assert used[h].tolist() == pytest.approx([float(values.mean()), float(values.std(unbiased=False))])
        assert histograms[h].sum() == values.numel()
    for w, lab in zip(weights, labels, strict=True):
        assert not w.requires_grad and w.grad_fn is None
        assert (w[lab == IGNORE_INDEX] == 0).all() and (w[lab != IGNORE_INDEX] > 0).all()


def test_direction_up_weighs_hard_pairs_more_and_down_less():
    signals, labels = step_case(6)
    up, _, _, _ = weights_for(signals, labels, direction="up")
    down, _, _, _ = weights_for(signals, labels, direction="down")
    for h in range(3):
        order = torch.argsort(head_values(signals, labels, h))  # easiest pair first
        w_up, w_down = head_values(up, labels, h)[order], head_values(down, labels, h)[order]
        assert (w_up.diff() >= 0).all() and (w_down.diff() <= 0).all()
        assert w_up[-1] > w_up[0] and w_down[-1] < w_down[0]


def test_a_signal_without_spread_gives_uniform_weights_and_huge_z_stays_finite():
    _, labels = step_case(7)
    flat = [torch.full(lab.shape, 0.3) for lab in labels]
    weights, _, _, _ = weights_for(flat, labels)
    assert all(torch.equal(w[lab != IGNORE_INDEX], torch.ones(int((lab != IGNORE_INDEX).sum())))
               for w, lab in zip(weights, labels, strict=True))
    spike = [torch.zeros(lab.shape) for lab in labels]
    spike[0][1, 2, :] = 1.0  # one hard pair per head: z ≈ 9, exp(z/T) overflows fp32 at T = 0.05
    weights, _, _, _ = weights_for(spike, labels, temperature=0.05)
    for h in range(3):
        got = head_values(weights, labels, h)
        assert torch.isfinite(got).all() and got.max() == 3.0
        assert got.double().mean().item() == pytest.approx(1.0, abs=1e-5)


def test_ema_smooths_the_standardisation_over_steps():
    (first, second), labels = step_case(8)
    (lab1, lab2) = labels
    second = second * 3  # a step whose signal spreads three times wider
    _, _, _, after_first = weights_for([first], [lab1], smoothing="ema", ema_decay=0.75)
    w, metrics, _, used = weights_for([second], [lab2], smoothed=after_first, smoothing="ema", ema_decay=0.75)
    alone, _, _, _ = weights_for([second], [lab2])
    for h in range(3):
        a, b = head_values([first], [lab1], h).double(), head_values([second], [lab2], h).double()
        mean = 0.75 * a.mean() + 0.25 * b.mean()
        std = 0.75 * a.std(unbiased=False) + 0.25 * b.std(unbiased=False)
        assert used[h].tolist() == pytest.approx([float(mean), float(std)])
        assert metrics[f"gradnorm/ema_std_head{h}"] == pytest.approx(float(std))
        expected = mean1_clip(torch.exp((b - mean) / std), torch.ones_like(b, dtype=torch.bool))
        torch.testing.assert_close(head_values(w, [lab2], h), expected, rtol=1e-5, atol=1e-6)
    # the smaller smoothed std sharpens the weights of the wide step
    assert head_values(w, [lab2], 1).std() > head_values(alone, [lab2], 1).std()


def test_settings_refuse_keys_of_another_smoothing_and_bounds_that_cannot_average_1():
    with pytest.raises(ValueError, match="`ema_decay` only applies to smoothing: ema"):
        GradNormSettings(ema_decay=0.5)
    for bad in ({"eps": 1.5}, {"w_max": 0.8}):
        with pytest.raises(ValueError):
            GradNormSettings(**bad)


def _rank_weights(rank: int, world: int, port: int, steps: list, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        info = DistInfo(rank, world, rank, torch.device("cpu"))
        mine = slice(rank * 2, rank * 2 + 2)  # each rank holds 2 of the 4 sequences of every micro-batch
        smoothed, out = None, []
        for signals, labels in steps:
            w, metrics, _, smoothed = weights_for([s[mine] for s in signals], [lab[mine] for lab in labels],
                                                  info=info, smoothed=smoothed, smoothing="ema", ema_decay=0.5,
                                                  temperature=0.7)
            out.append((w, metrics))
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_standardise_and_clip_like_one_process(tmp_path):
    """Statistics (and their moving averages) run over all ranks: 2 ranks with half the sequences each give the
    weights one process gives for the whole step, step after step."""
    import socket

    import torch.multiprocessing as mp

    steps = [step_case(9), step_case(10)]
    single, smoothed = [], None
    for signals, labels in steps:  # one process: rank 0's rows of every micro-batch first, then rank 1's
        w, metrics, _, smoothed = weights_for([s[:2] for s in signals] + [s[2:] for s in signals],
                                              [lab[:2] for lab in labels] + [lab[2:] for lab in labels],
                                              smoothed=smoothed, smoothing="ema", ema_decay=0.5, temperature=0.7)
        single.append((w, metrics))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_rank_weights, args=(2, port, steps, str(tmp_path)), nprocs=2, start_method="spawn")
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for (w0, metrics0), (w1, _), (w, metrics) in zip(rank0, rank1, single, strict=True):
        for k in range(2):
            assert torch.allclose(w0[k], w[k], atol=1e-6) and torch.allclose(w1[k], w[2 + k], atol=1e-6)
        assert metrics0 == pytest.approx(metrics)


# ------------------------------------------------------------------------------------------------ training
def test_training_with_the_recipe_logs_metrics_and_histograms(tmp_path, capsys):
    from mlflow import MlflowClient

    recipe = {"algorithm": "gradnorm", "gradnorm": RECIPE["gradnorm"], "train": {"max_steps": 3}}
    assert main(train_args(tmp_path, "gradnorm", recipe=recipe, config={"mlflow": {"enabled": True}})) == 0
    assert "finished at step 3/3" in capsys.readouterr().out
    run_dir = tmp_path / "runs" / "gradnorm"
    histogram = json.loads((run_dir / "gradnorm_weight_histogram.json").read_text())
    assert len(histogram["counts_per_head"]) == 3 and sum(histogram["counts_per_head"][2]) > 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    metrics = run.data.metrics
    for h in range(3):
        assert metrics[f"gradnorm/weight_mean_head{h}"] == pytest.approx(1.0, abs=1e-5)
        assert 1.0 < metrics[f"gradnorm/weight_max_head{h}"] <= 3.0
        assert 0 < metrics[f"gradnorm/signal_mean_head{h}"] < 2 ** 0.5
    history = client.get_metric_history(run.info.run_id, "gradnorm/signal_std_head0")
    assert [m.step for m in history] == [1, 2, 3]


def test_resume_restores_the_moving_averages_bit_identically(tmp_path):
    recipe = {"algorithm": "gradnorm", "gradnorm": {"smoothing": "ema", "ema_decay": 0.5, "temperature": 0.5},
              "train": {"max_steps": 4}}
    config = {"checkpoint": {"every_steps": 2, "keep_last": 5}}
    assert main(train_args(tmp_path, "full", recipe=recipe, config=config)) == 0
    full = tmp_path / "runs" / "full"
    from safetensors.torch import load_file

    assert load_file(full / "checkpoints" / "step-00000002" / "scheme.safetensors")["ema"].shape == (3, 2)
    resumed = tmp_path / "runs" / "resumed"
    shutil.copytree(full / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002")
    config_path, recipe_path = files(tmp_path, recipe=recipe, config=config)
    assert main(["train", "--config", str(config_path), "--recipe", str(recipe_path),
                 "--resume", str(resumed / "checkpoints" / "step-00000002")]) == 0
    a, b = final_weights(full), final_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
