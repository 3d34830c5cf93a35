"""The checkpointer (components/checkpointer.py) and the checkpoint parts the trainer and critic stage 1 share:
save and restore of a step, resume discovery (local leftovers, a path, a run lost with its machine and found in a
real S3 store), the final model with its upload, the small-module checkpoint and optimizer serializer, the early
stopper's observations and state, and the rank-padded validation rows."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers.models import tiny_llama
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from wmtp.components.checkpoint import (
    load_optimizer_tensors,
    load_small_checkpoint,
    optimizer_tensors,
    save_small_checkpoint,
)
from wmtp.components.checkpointer import Checkpointer, find_resume
from wmtp.components.early_stopping import EarlyStopper
from wmtp.components.validate import validation_rows
from wmtp.config import Checkpointing, ConfigError, EarlyStopping, Tracking
from wmtp.model.mtp import MTPLoss, MTPModel
from wmtp.runtime.distributed import DistInfo
from wmtp.runtime.mirror import COMPLETE, RunMirror
from wmtp.runtime.tracking import Tracker

ONE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>")


def checkpointer(run_dir, seed: int = 0, mirror: RunMirror | None = None) -> Checkpointer:
    model = MTPModel.from_base(tiny_llama(seed), n_heads=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return Checkpointer(run_dir, model, optimizer, scheduler, tokenizer(), ONE, Checkpointing(keep_last=2),
                        Tracking(enabled=False), mirror)


def train_step(ck: Checkpointer) -> None:
    ids = torch.arange(4, 16).view(2, 6) % 90 + 3
    out = ck.model(ids, torch.ones_like(ids), MTPLoss(torch.stack([ids, ids.roll(-1, 1)], -1)))
    out.loss.backward()
    ck.optimizer.step()
    ck.scheduler.step()
    ck.optimizer.zero_grad(set_to_none=True)


def test_a_saved_step_restores_model_optimizer_scheduler_and_state_and_trains_on_identically(tmp_path):
    ck = checkpointer(tmp_path / "run")
    train_step(ck)
    path = ck.save(1, {"mlflow_run_id": "abc"}, {"head/w": torch.ones(3)}, {})
    assert path == tmp_path / "run" / "checkpoints" / "step-00000001"
    other = checkpointer(tmp_path / "other", seed=1)
    state = other.restore(path)
    assert state["step"] == 1 and state["mlflow_run_id"] == "abc"
    assert torch.equal(state["scheme_tensors"]["head/w"], torch.ones(3))
    assert other.scheduler.state_dict() == ck.scheduler.state_dict()
    train_step(ck)
    train_step(other)
    for (name, a), b in zip(ck.model.state_dict().items(), other.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_find_resume_takes_the_latest_complete_checkpoint_and_removes_a_killed_save(tmp_path):
    run = tmp_path / "run"
    assert find_resume(None, run) is None and find_resume("auto", run) is None
    ck = checkpointer(run)
    ck.save(1, {}, None, {})
    ck.save(2, {}, None, {})
    leftover = run / "checkpoints" / ".step-00000003.partial"
    leftover.mkdir()
    assert find_resume("auto", run) == run / "checkpoints" / "step-00000002"
    assert not leftover.exists()
    assert find_resume(str(run / "checkpoints" / "step-00000001"), run) == run / "checkpoints" / "step-00000001"


def test_resume_from_a_directory_that_is_not_a_checkpoint_is_one_line_naming_the_flag(tmp_path):
    with pytest.raises(ConfigError, match=r"--resume .*nowhere: not a checkpoint directory \(no trainer_state"):
        find_resume(str(tmp_path / "nowhere"), tmp_path / "run")


def test_a_mirrored_run_uploads_its_checkpoints_and_final_model_and_resumes_from_the_store(tmp_path, s3):
    client, bucket = s3
    url = f"s3://{bucket}/runs/r"
    run = tmp_path / "staging" / "r"
    mirror = RunMirror(run, url, rank=0, world_size=1, keep_last=2, retries=1, backoff_seconds=0.01)
    ck = checkpointer(run, mirror=mirror)
    train_step(ck)
    ck.save(1, {}, None, {})
    tracker = Tracker(Tracking(enabled=False), tmp_path, "r", active=True)
    final = ck.save_final(tracker, lambda directory: (directory / "extra.txt").write_text("the scheme's file"))
    ck.finish_uploads()
    assert not ck.upload_failed()
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert {f"runs/r/checkpoints/step-00000001/{COMPLETE}", "runs/r/final/extra.txt"} <= keys
    assert final == run / "final"
    shutil.rmtree(run)  # the machine is lost
    found = find_resume("auto", run, run_url=url)
    assert found == run / "checkpoints" / "step-00000001"
    again = checkpointer(tmp_path / "again", seed=1)
    again.restore(found)
    for (name, a), b in zip(ck.model.state_dict().items(), again.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_small_checkpoint_keeps_tensors_optimizer_and_state_and_is_replaced_whole(tmp_path):
    head = torch.nn.Linear(4, 1)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2)
    head(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    optim, groups = optimizer_tensors(optimizer, "optim")
    save_small_checkpoint(tmp_path / "stage1", {"head/weight": head.weight.detach(), **optim},
                          {"step": 3, "param_groups": groups})
    save_small_checkpoint(tmp_path / "stage1", {"head/weight": head.weight.detach(), **optim},
                          {"step": 4, "param_groups": groups})
    tensors, state = load_small_checkpoint(tmp_path / "stage1")
    assert state["step"] == 4 and sorted(p.name for p in (tmp_path / "stage1").iterdir()) == [
        "state.json", "state.safetensors"]
    fresh = torch.optim.AdamW(torch.nn.Linear(4, 1).parameters(), lr=1.0)
    load_optimizer_tensors(fresh, tensors, state["param_groups"], "optim")
    assert fresh.param_groups[0]["lr"] == 1e-2
    for key, value in optimizer.state_dict()["state"][0].items():
        assert torch.equal(torch.as_tensor(fresh.state_dict()["state"][0][key]), torch.as_tensor(value)), key


def test_a_small_checkpoint_is_never_taken_for_a_training_checkpoint(tmp_path):
    save_small_checkpoint(tmp_path / "critic" / "stage1", {"x": torch.zeros(1)}, {"step": 1})
    with pytest.raises(ConfigError, match="not a checkpoint directory"):
        find_resume(str(tmp_path / "critic" / "stage1"), tmp_path)


def test_a_damaged_small_checkpoint_is_an_error_naming_its_file(tmp_path):
    save_small_checkpoint(tmp_path / "s", {"x": torch.zeros(1)}, {"step": 1})
    (tmp_path / "s" / "state.json").write_text("{")
    with pytest.raises(ConfigError, match=r"s/state.json: not valid JSON"):
        load_small_checkpoint(tmp_path / "s")


def test_the_early_stopper_says_whether_an_evaluation_improved_and_restores_its_state():
    stopper = EarlyStopper(EarlyStopping(metric="val/x", mode="min", patience=2, min_delta=0.1))
    assert [stopper.observe({"val/x": v}) for v in (1.0, 0.95, 0.5)] == [True, False, True]
    assert stopper.observe({"val/y": 0.0}) is None and stopper.state() == {"best": 0.5, "bad_evals": 0}
    again = EarlyStopper(stopper.rule)
    again.load_state({"best": 0.5, "bad_evals": 1})
    assert not again.exhausted() and again.should_stop({"val/x": 0.45}) and again.exhausted()
    assert not again.should_stop({}) and not EarlyStopper(None).should_stop({"val/x": 1.0})


@pytest.mark.parametrize("n, batch, cap", [(10, 3, None), (10, 3, 3), (2, 4, None), (7, 2, 1)])
def test_validation_rows_give_every_rank_the_same_number_of_batches_and_each_row_once(n, batch, cap):
    per_rank = [list(validation_rows(n, batch, cap, DistInfo(r, 2, r, torch.device("cpu")))) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1])
    real = sorted(int(i) for rows in per_rank for index, measured in rows if measured for i in index)
    n_batches = -(-n // batch) if cap is None else min(-(-n // batch), cap)
    assert real == list(range(min(n, n_batches * batch)))
    assert all(len(index) > 0 for rows in per_rank for index, _ in rows)
