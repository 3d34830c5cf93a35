import contextlib
import math

import pytest
import torch
from helpers.models import tiny_gpt2, tiny_llama
from helpers.tiny_run import train_args

from wmtp import IGNORE_INDEX, mtp_labels
from wmtp.cli import main
from wmtp.runtime.distributed import DistInfo
from wmtp.weighting.reference import check_tokenizers_compatible, reference_target_ce
from wmtp.weighting.rho1.scheme import Rho1Settings, excess_loss, rho1_weights

ONE = DistInfo(0, 1, 0, torch.device("cpu"))


def weights_for(excess, labels, **overrides):
    s = Rho1Settings(**{k: v for k, v in overrides.items() if k in Rho1Settings.model_fields})
    w, metrics, _ = rho1_weights(excess, labels, mode=s.mode, temperature=s.temperature, eps=s.eps, w_max=s.w_max,
                              skip_fraction=s.skip_fraction, keep_fraction=s.keep_fraction,
                              min_ce_diff=s.min_ce_diff, train_head0_fully=s.train_head0_fully, info=ONE)
    return w, metrics


def test_excess_uses_the_reference_ce_of_the_token_each_head_predicts():
    x = torch.tensor([[10, 11, 12, 13, 14, 15]])
    labels = mtp_labels(x, 3)
    ref = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])  # ref[j] for token x_j
    model_ce = torch.full(labels.shape, 10.0)
    e = excess_loss(model_ce, ref, labels)[0]
    # t=0: heads predict x1, x2, x3 -> 10 - (1, 2, 3); t=3: x4, x5, ignored
    assert torch.equal(e[0], torch.tensor([9.0, 8.0, 7.0]))
    assert torch.equal(e[3], torch.tensor([6.0, 5.0, 0.0]))
    assert torch.equal(e[5], torch.zeros(3))


def test_reference_ce_scores_the_next_token_not_a_shifted_one():
    # logits at position t put all mass on x[t+1]: the oracle reference has CE ~ 0 at every valid target
    x = torch.tensor([[3, 7, 1, 4, 5, 9]])
    logits = torch.full((1, 6, 10), -30.0)
    for t in range(5):
        logits[0, t, x[0, t + 1]] = 30.0
    ref = reference_target_ce(logits, x)
    assert ref[0, 0] == 0 and torch.all(ref[0, 1:] < 1e-6)
    # a reference shifted by one (the seed's bug) would be far from 0
    shifted = reference_target_ce(torch.roll(logits, 1, dims=1), x)
    assert torch.all(shifted[0, 2:] > 10)


def test_identical_reference_gives_zero_excess_and_uniform_weights():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50, (2, 9), generator=g)
    labels = mtp_labels(x, 2)
    logits = torch.randn(2, 9, 50, generator=g)
    ref = reference_target_ce(logits, x)
    model_ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), x[:, 1:].reshape(-1),
                                                 reduction="none").view(2, 8)
    ce = torch.zeros(labels.shape)
    ce[:, :-1, 0] = model_ce  # head 0 of a model identical to the reference
    labels[..., 1] = IGNORE_INDEX
    e = excess_loss(ce, ref, labels)
    assert torch.allclose(e, torch.zeros_like(e), atol=1e-6)
    w, _ = weights_for([e.round(decimals=5)], [labels], mode="weighted")
    valid = labels != IGNORE_INDEX
    assert torch.allclose(w[0][valid], torch.ones(int(valid.sum())))


def test_ties_keep_step_order_in_selection_modes():
    labels = torch.zeros(1, 10, 1, dtype=torch.long)
    e = torch.zeros(1, 10, 1)
    w, _ = weights_for([e], [labels], mode="topk", keep_fraction=0.3)
    assert w[0][0, :, 0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]


def test_signed_excess_not_absolute():
    labels = torch.zeros(1, 4, 1, dtype=torch.long)
    e = torch.tensor([-5.0, 0.0, 1.0, 5.0]).view(1, 4, 1)  # -5: the model already beats the reference
    w, _ = weights_for([e], [labels], mode="topk", keep_fraction=0.5)
    assert w[0][0, :, 0].tolist() == [0, 0, 1, 1]
    ww, _ = weights_for([e], [labels], mode="weighted")
    assert ww[0][0, 0, 0] < ww[0][0, 2, 0] < ww[0][0, 3, 0]


@pytest.mark.parametrize("p", [0.0, 0.3, 0.5, 0.99])
def test_token_skip_keeps_ceil_of_valid_pairs_per_head_across_micro_batches(p):
    g = torch.Generator().manual_seed(1)
    batches, excess = [], []
    for length in (7, 4):
        x = torch.randint(0, 9, (2, 8), generator=g)
        mask = torch.ones(2, 8, dtype=torch.long)
        mask[1, length:] = 0
        labels = mtp_labels(x, 3, attention_mask=mask)
        batches.append(labels)
        excess.append(torch.randn(labels.shape, generator=g) * (labels != IGNORE_INDEX))
    w, metrics = weights_for(excess, batches, mode="token_skip", skip_fraction=p)
    for h in range(3):
        n_valid = sum(int((lab[..., h] != IGNORE_INDEX).sum()) for lab in batches)
        kept = sum(int((wi[..., h] > 0).sum()) for wi in w)
        assert kept == math.ceil((1 - p) * n_valid)
        for lab, wi in zip(batches, w, strict=True):  # padding and ignored pairs are never selected
            assert (wi[..., h][lab[..., h] == IGNORE_INDEX] == 0).all()
        assert metrics[f"rho1/selected_frac_head{h}"] == pytest.approx(kept / n_valid)


def test_selection_is_per_head():
    # head 1's excess is larger everywhere (structural); per-head ranking still keeps k% of each head
    labels = torch.zeros(1, 10, 2, dtype=torch.long)
    e = torch.stack([torch.arange(10.0), torch.arange(10.0) + 100], dim=-1).unsqueeze(0)
    w, _ = weights_for([e], [labels], mode="topk", keep_fraction=0.5)
    assert int(w[0][..., 0].sum()) == 5 and int(w[0][..., 1].sum()) == 5


def test_min_ce_diff_and_head0_fully():
    labels = torch.zeros(1, 6, 2, dtype=torch.long)
    e = torch.tensor([-2.0, -1.0, 0.5, 1.0, 2.0, 3.0]).view(1, 6, 1).expand(1, 6, 2).clone()
    w, _ = weights_for([e], [labels], mode="token_skip", skip_fraction=0.0, min_ce_diff=0.75)
    assert w[0][0, :, 1].tolist() == [0, 0, 0, 1, 1, 1]
    w, _ = weights_for([e], [labels], mode="topk", keep_fraction=0.5, train_head0_fully=True)
    assert w[0][0, :, 0].tolist() == [1] * 6 and w[0][0, :, 1].tolist() == [0, 0, 0, 1, 1, 1]
    w, _ = weights_for([e], [labels], mode="weighted", min_ce_diff=0.0)
    low = w[0][0, :2, 1]
    assert (low <= w[0][0, 2:, 1].min()).all()


def test_weighted_mode_statistics_and_clip():
    g = torch.Generator().manual_seed(3)
    labels = torch.zeros(2, 50, 2, dtype=torch.long)
    e = torch.randn(2, 50, 2, generator=g) * 3
    w, _ = weights_for([e], [labels], mode="weighted", temperature=0.5, eps=0.1, w_max=2.0)
    for h in range(2):
        head = w[0][..., h]
        assert head.mean().item() == pytest.approx(1.0, rel=1e-5)
        assert head.max() <= 2.0 and head.min() >= 0.1  # mean1_clip keeps every weight in [eps, w_max]
    assert not w[0].requires_grad


def test_mode_specific_keys_are_refused_for_other_modes():
    with pytest.raises(ValueError, match="keep_fraction` only applies to mode topk"):
        Rho1Settings(mode="token_skip", keep_fraction=0.5)


def test_tokenizer_mismatch_is_a_clear_error():
    from wmtp.data.sequences import train_bpe_tokenizer

    a = train_bpe_tokenizer(["def f(x): return x\n" * 20], 300, 2)
    b = train_bpe_tokenizer(["something else entirely\n" * 20], 300, 2)
    check_tokenizers_compatible(a, a)
    with pytest.raises(ValueError, match="reference_model: tokenizer has 277 tokens, the trained model's has 269"):
        check_tokenizers_compatible(a, b)
    # same size, different merges: the probe strings catch it
    c = train_bpe_tokenizer(["xyz " * 20 + "".join(chr(97 + i % 26) * 3 for i in range(200))], len(a), 1)
    assert len(c) == len(a)
    with pytest.raises(ValueError, match="reference_model: tokenizes"):
        check_tokenizers_compatible(a, c)


def test_rho1_workflow_reference_then_weighted_training(tmp_path, capsys):
    # step 1: a next-token reference on the same data (tokenizer trained from the same texts -> same ids)
    assert main(train_args(tmp_path, "reference", recipe={"mtp": {"n_heads": 1}, "train": {"max_steps": 5}})) == 0
    reference = tmp_path / "runs" / "reference" / "final"
    # step 2: Rho-1 training against it (topk keeps 60% per head)
    args = train_args(tmp_path, "rho1", config={"reference_model": {"path": str(reference)}},
                      recipe={"algorithm": "rho1", "rho1": {"mode": "topk", "keep_fraction": 0.6},
                              "loss": {"reduction": "weight_mean"}, "train": {"max_steps": 3}})
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "finished at step 3/3" in out
    import json

    histogram = json.loads((tmp_path / "runs" / "rho1" / "rho1_weight_histogram.json").read_text())
    assert len(histogram["counts_per_head"]) == 3
    # topk weights are 0 or 1: every step's valid pairs land in the first bin or the bin holding 1.0
    assert sum(histogram["counts_per_head"][1]) > 0


def test_rho1_without_reference_model_fails_clearly(tmp_path, capsys):
    args = train_args(tmp_path, "rho1", recipe={"algorithm": "rho1", "rho1": {"mode": "weighted"}})
    assert main([*args, "--dry-run"]) == 1
    assert "needs config `reference_model`" in capsys.readouterr().err


def test_reference_cache_equals_online_and_mismatch_is_an_error(tmp_path, capsys):
    from safetensors.torch import load_file

    assert main(train_args(tmp_path, "reference", recipe={"mtp": {"n_heads": 1}, "train": {"max_steps": 5}})) == 0
    reference = str(tmp_path / "runs" / "reference" / "final")
    rho1 = {"algorithm": "rho1", "rho1": {"mode": "weighted"}, "train": {"max_steps": 2}}
    cache = str(tmp_path / "ref-cache.safetensors")
    online_args = train_args(tmp_path, "online", config={"reference_model": {"path": reference}}, recipe=rho1)
    assert main(online_args) == 0
    cached_config = {"reference_model": {"path": reference}, "reference_cache": cache}
    cached_args = train_args(tmp_path, "cached", config=cached_config, recipe=rho1)
    assert main(cached_args) == 1  # no cache yet: a clear error, no silent online fallback
    assert "wmtp score-reference" in capsys.readouterr().err
    assert main(["score-reference", *cached_args[1:5]]) == 0
    assert "scored" in capsys.readouterr().out
    assert main(cached_args) == 0
    online = load_file(tmp_path / "runs" / "online" / "final" / "model.safetensors")
    cached = load_file(tmp_path / "runs" / "cached" / "final" / "model.safetensors")
    for key in online:
        assert torch.allclose(online[key], cached[key], atol=1e-6), key
    # other data (another shuffle) with the same cache file: refused
    other = train_args(tmp_path, "other", config=cached_config, recipe={**rho1, "data": {"shuffle_seed": 5}})
    assert main(other) == 1
    assert "fingerprint does not match" in capsys.readouterr().err


def _rank_weights(rank: int, world: int, port: int, excess: list, labels: list, mode: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        info = DistInfo(rank, world, rank, torch.device("cpu"))
        mine = slice(rank * 2, rank * 2 + 2)  # each rank holds 2 of the 4 sequences of every micro-batch
        s = Rho1Settings(mode=mode)
        w, _, _ = rho1_weights([e[mine] for e in excess], [lab[mine] for lab in labels], mode=s.mode,
                               temperature=s.temperature, eps=s.eps, w_max=s.w_max, skip_fraction=s.skip_fraction,
                               keep_fraction=s.keep_fraction, min_ce_diff=None, train_head0_fully=False, info=info)
        torch.save(w, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["weighted", "topk"])
def test_two_ranks_select_like_one_process(tmp_path, mode):
    """Statistics and selection run over all ranks: 2 ranks with half the sequences each give the weights that
    one process gives for the whole step (ties need the rank-major order, so values here are distinct)."""
    import socket

    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(7)
    labels = [mtp_labels(torch.randint(0, 9, (4, 8), generator=g), 2) for _ in range(2)]
    excess = [torch.randn(lab.shape, generator=g) * (lab != IGNORE_INDEX) for lab in labels]
    # one process sees the same pairs in the order of the ranks' concatenation: rank 0's rows of every
    # micro-batch first, then rank 1's
    single, _ = weights_for([e[:2] for e in excess] + [e[2:] for e in excess],
                            [lab[:2] for lab in labels] + [lab[2:] for lab in labels], mode=mode)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_rank_weights, args=(2, port, excess, labels, mode, str(tmp_path)), nprocs=2,
                       start_method="spawn")
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for k in range(2):
        assert torch.allclose(rank0[k], single[k], atol=1e-6)
        assert torch.allclose(rank1[k], single[2 + k], atol=1e-6)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_chunked_reference_ce_equals_the_full_logits_path(make):
    from wmtp.weighting.reference import reference_target_ce, score_reference_batch

    reference = make(3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 64, (3, 17), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    with torch.no_grad():
        full = reference_target_ce(reference(input_ids=ids, attention_mask=mask).logits, ids, mask)
        for chunk in (1, 5, 256):
            chunked = score_reference_batch(reference, ids, mask, contextlib.nullcontext(), chunk)
            torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    assert full[1, 13:].abs().sum() == 0 and full[:, 0].abs().sum() == 0


def test_weighted_mode_survives_a_dominant_pair_at_low_temperature():
    """z/T far beyond fp32's exp range (one pair's excess dwarfs the rest, T = 0.05): the weights stay finite,
    with mean 1 and within [eps, w_max] (exp is taken of z/T shifted by its maximum)."""
    labels = [mtp_labels(torch.arange(60).reshape(3, 20) % 17, 2)]
    excess = [torch.where(labels[0] != IGNORE_INDEX, torch.full(labels[0].shape, 0.01), torch.zeros(()))]
    excess[0][0, 0, 0] = 50.0
    (w,), _ = weights_for(excess, labels, mode="weighted", temperature=0.05)
    valid = labels[0] != IGNORE_INDEX
    assert torch.isfinite(w).all()
    for h in range(2):
        head = w[..., h][valid[..., h]]
        assert float(head.mean()) == pytest.approx(1.0, abs=1e-5)
        assert float(head.min()) >= 0.05 - 1e-6 and float(head.max()) <= 3.0 + 1e-6
    assert float(w[0, 0, 0]) == pytest.approx(3.0, abs=1e-5)
