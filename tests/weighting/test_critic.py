"""Critic-WMTP end to end on a synthetic task whose reward is decided by one marker word, plus the stage
handoff, resume, a given value head, early stopping, and the weights' properties."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers.critic_runs import CPU, setup_for
from safetensors.torch import load_file

from wmtp.config import ConfigError
from wmtp.data.sequences import labels_for
from wmtp.loss import IGNORE_INDEX
from wmtp.runtime.distributed import DistInfo
from wmtp.training.trainer import Trainer
from wmtp.weighting.base import StepBatch
from wmtp.weighting.critic.returns import td_errors


def marker_position(setup, row: int) -> int | None:
    mark = setup.tokenizer(" MARK", add_special_tokens=False)["input_ids"][0]
    ids = setup.val_set.input_ids[row].tolist()
    return ids.index(mark) if mark in ids else None


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("critic")
    setup = setup_for(tmp)
    trainer = Trainer(setup, tmp / "runs" / "run", run_name="run")
    result = trainer.run()
    return setup, trainer, result, tmp


def test_stage1_td_error_peaks_at_the_marker(trained):
    setup, trainer, result, _ = trained
    assert result["status"] == "FINISHED"
    scheme, val = trainer.scheme, setup.val_set
    with torch.no_grad():
        values = scheme.head(scheme.value.trunk(val.input_ids, val.attention_mask))
    delta, defined = td_errors(values, scheme.value.val_rewards, val.attention_mask, val.document_ids, 1.0)
    hits = total = 0
    for r in range(len(val)):
        j = marker_position(setup, r)
        if j is not None:
            total += 1
            hits += int(torch.where(defined[r], delta[r], torch.tensor(-1e9)).argmax()) == j
    assert total >= 10 and hits >= 0.9 * total, f"TD error peaks at the marker in {hits}/{total} documents"
    assert result["eval"]["val/critic_explained_variance"] > 0.1


def test_stage2_gives_the_marker_the_largest_weight_on_every_head_that_predicts_it(trained):
    setup, trainer, _, _ = trained
    val = setup.val_set
    rows = torch.arange(len(val))
    batch = val.select(rows)
    labels = labels_for(batch, 3, False)
    scheme = trainer.scheme
    scheme.value.train_rewards = scheme.value.val_rewards  # score the held-out rows
    (weights,) = scheme.step_weights([StepBatch(batch["input_ids"], batch["attention_mask"], labels, rows,
                                                batch["document_ids"])])
    assert not weights.requires_grad and weights.grad_fn is None
    assert (weights[labels == IGNORE_INDEX] == 0).all() and (weights[labels != IGNORE_INDEX] > 0).all()
    for h in range(3):
        head_w = weights[..., h][labels[..., h] != IGNORE_INDEX]
        assert head_w.mean() == pytest.approx(1.0, abs=1e-4)  # mean1_clip over the step, per head
        hits = total = 0
        for r in range(len(val)):
            j = marker_position(setup, r)
            if j is not None and j - 1 - h >= 0:
                total += 1
                hits += int(weights[r, :, h].argmax()) == j - 1 - h  # head h at t predicts x[t+1+h]
        assert total >= 10 and hits >= 0.9 * total, f"head {h}: marker has the largest weight in {hits}/{total}"


def test_final_model_carries_the_value_head_and_it_can_skip_stage1(trained, tmp_path):
    _, trainer, result, tmp = trained
    final = Path(result["final_model"])
    assert (final / "value_head.safetensors").is_file()
    assert (tmp / "runs" / "run" / "critic" / "value_head.safetensors").is_file()
    setup = setup_for(tmp_path, critic={"value_head_path": str(final)}, pretrain=False)
    again = Trainer(setup, tmp_path / "runs" / "given", run_name="given")
    start = {k: v.clone() for k, v in again.scheme.head.state_dict().items()}
    given = load_file(final / "value_head.safetensors")
    assert all(torch.equal(start[k], given[k]) for k in start)
    assert again.run()["status"] == "FINISHED"
    assert not (tmp_path / "runs" / "given" / "critic").exists()  # no stage 1


def test_value_head_shape_mismatch_is_an_error(trained, tmp_path):
    _, _, result, _ = trained
    path = Path(result["final_model"]) / "value_head.safetensors"
    from wmtp.weighting.critic.value import load_value_head

    with pytest.raises(ConfigError, match="hidden size 64, the model's is 32"):
        load_value_head(path, 32)


def final_head(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "value_head.safetensors")


def test_resume_inside_stage1_and_across_the_stage_boundary_is_bit_identical(tmp_path):
    pretrain = {"max_steps": 6, "eval_every": 2}
    train = {"max_steps": 4}
    whole = Trainer(setup_for(tmp_path, pretrain=pretrain, train=train), tmp_path / "runs" / "whole",
                    run_name="whole")
    assert whole.run()["status"] == "FINISHED"

    # stopped by a signal after stage-1 step 3: stage 1 resumes from its own checkpoint (step 2)
    run_dir = tmp_path / "runs" / "split"
    first = Trainer(setup_for(tmp_path, pretrain=pretrain, train=train), run_dir, run_name="split")
    calls = {"n": 0}

    def stop_after_three():
        calls["n"] += 1
        return calls["n"] >= 3

    first.stop_requested = stop_after_three
    assert first.run()["status"] == "STOPPED"
    assert json.loads((run_dir / "critic" / "stage1" / "state.json").read_text())["step"] in (2, 3)
    assert not (run_dir / "critic" / "value_head.safetensors").exists()
    from wmtp.components.checkpointer import find_resume

    second = Trainer(setup_for(tmp_path, pretrain=pretrain, train=train), run_dir, run_name="split",
                     resume=find_resume("auto", run_dir))
    calls["n"] = 0

    def stop_in_stage2():  # stage 1 finishes (6 steps), then stage 2 stops after its second step
        calls["n"] += 1
        return second.scheme.stage1_done and second.step >= 2

    second.stop_requested = stop_in_stage2
    assert second.run()["status"] == "STOPPED"
    assert second.scheme.stage1_done and second.step == 2
    third = Trainer(setup_for(tmp_path, pretrain=pretrain, train=train), run_dir, run_name="split",
                    resume=find_resume("auto", run_dir))
    assert third.step == 2 and third.scheme.stage1_done
    assert third.run()["status"] == "FINISHED"
    for key, value in final_head(tmp_path / "runs" / "whole").items():
        assert torch.equal(value, final_head(run_dir)[key]), key


@pytest.mark.parametrize(("mode", "extra", "stops_early"), [
    ("loss", {"patience": 1, "min_delta": 1e9}, True),
    ("loss_and_gradient", {"patience": 1, "min_delta": 1e9, "grad_cv_max": 1e-12}, False),
    ("loss_and_gradient", {"patience": 1, "min_delta": 1e9, "grad_cv_max": 1e9}, True),
    ("none", {}, False),
])
def test_stage1_early_stopping_modes(tmp_path, mode, extra, stops_early):
    pretrain = {"max_steps": 12, "eval_every": 3, "early_stopping": mode, **extra}
    trainer = Trainer(setup_for(tmp_path, pretrain=pretrain), tmp_path / "runs" / "es", run_name="es")
    trainer.run()
    steps = int(trainer.scheme.stage1_meta["steps"])
    assert (steps < 12) == stops_early, (mode, steps)


def test_stage1_needs_validation_data_for_early_stopping(tmp_path):
    # a set-up check, so --dry-run reports it
    with pytest.raises(ConfigError, match="pretrain.early_stopping needs validation data"):
        setup_for(tmp_path, pretrain={"early_stopping": "loss"}, validation_fraction=0.0)


def _critic_rank_weights(rank: int, world: int, port: int, signals: list, labels: list, out_dir: str) -> None:
    import torch.distributed as dist

    from wmtp.weighting.critic.scheme import critic_weights

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        info = DistInfo(rank, world, rank, torch.device("cpu"))
        mine = slice(rank * 2, rank * 2 + 2)
        w, metrics, _ = critic_weights([s[mine] for s in signals], [lab[mine] for lab in labels], temperature=0.7,
                                       eps=0.05, w_max=3.0, info=info)
        torch.save((w, metrics), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_standardise_and_clip_like_one_process(tmp_path):
    """The per-head standardisation and mean1_clip run over the whole step on all ranks."""
    import socket

    import torch.multiprocessing as mp

    from wmtp.loss import mtp_labels
    from wmtp.weighting.critic.scheme import critic_weights

    g = torch.Generator().manual_seed(3)
    labels = [mtp_labels(torch.randint(0, 9, (4, 10), generator=g), 3) for _ in range(2)]
    signals = [torch.randn(lab.shape, generator=g) * (lab != IGNORE_INDEX) for lab in labels]
    single, single_metrics, _ = critic_weights([s[:2] for s in signals] + [s[2:] for s in signals],
                                               [lab[:2] for lab in labels] + [lab[2:] for lab in labels],
                                               temperature=0.7, eps=0.05, w_max=3.0, info=CPU)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_critic_rank_weights, args=(2, port, signals, labels, str(tmp_path)), nprocs=2,
                       start_method="spawn")
    (rank0, metrics0), (rank1, _) = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for k in range(2):
        assert torch.allclose(rank0[k], single[k], atol=1e-6)
        assert torch.allclose(rank1[k], single[2 + k], atol=1e-6)
    assert metrics0 == pytest.approx(single_metrics)


def test_critic_weights_against_a_plain_computation():
    """Per head over all valid pairs: z = (s − mean)/std, w = mean1_clip(exp(z/T)); invalid pairs get 0."""
    from wmtp.loss import mean1_clip, mtp_labels
    from wmtp.weighting.critic.scheme import critic_weights

    g = torch.Generator().manual_seed(5)
    labels = [mtp_labels(torch.randint(0, 9, (3, 12), generator=g), 2,
                         attention_mask=(torch.arange(12) < 10).long().expand(3, 12)) for _ in range(2)]
    signals = [torch.randn(lab.shape, generator=g) for lab in labels]
    weights, metrics, _ = critic_weights(signals, labels, temperature=0.5, eps=0.1, w_max=2.0, info=CPU)
    for h in range(2):
        values = torch.cat([s[..., h][lab[..., h] != IGNORE_INDEX] for s, lab in zip(signals, labels, strict=True)])
        z = (values - values.mean()) / values.std(unbiased=False)
        expected = mean1_clip(torch.exp(z / 0.5), torch.ones_like(z, dtype=torch.bool), eps=0.1, w_max=2.0)
        got = torch.cat([w[..., h][lab[..., h] != IGNORE_INDEX] for w, lab in zip(weights, labels, strict=True)])
        torch.testing.assert_close(got, expected)
        p = expected / expected.sum()
        assert metrics[f"critic/weight_entropy_head{h}"] == pytest.approx(float(-(p * p.log()).sum() / math.log(
            len(p))), rel=1e-5)
    for w, lab in zip(weights, labels, strict=True):
        assert (w[lab == IGNORE_INDEX] == 0).all()


def test_critic_weights_survive_a_dominant_pair_at_low_temperature():
    """One pair's signal dwarfs the rest and T = 0.05 puts z/T far beyond fp32's exp: finite weights, mean 1,
    within [eps, w_max]; the equal others share one weight."""
    from wmtp.loss import mtp_labels
    from wmtp.weighting.critic.scheme import critic_weights

    labels = [mtp_labels(torch.arange(60).reshape(3, 20) % 17, 2)]
    valid = labels[0] != IGNORE_INDEX
    signal = torch.where(valid, torch.full(labels[0].shape, 0.01), torch.zeros(()))
    signal[0, 0, 0] = 50.0
    (w,), _, _ = critic_weights([signal], labels, temperature=0.05, eps=0.05, w_max=3.0,
                                info=DistInfo(0, 1, 0, torch.device("cpu")))
    head0 = w[..., 0][valid[..., 0]]
    assert torch.isfinite(w).all() and float(head0.mean()) == pytest.approx(1.0, abs=1e-5)
    assert float(head0.max()) == pytest.approx(3.0, abs=1e-5) and float(head0.min()) >= 0.05
    others = head0[head0 < 3.0]
    assert torch.allclose(others, others[0].expand_as(others))
