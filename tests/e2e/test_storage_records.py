"""A run's own records (run.json, metrics.jsonl) across a resume: every checkpoint keeps a copy of them as of its
step, and a resumed run continues that copy, so the records hold every step once (a stopped run's lines after its
checkpoint are logged again by the resumed run, not twice), lines a scheme's first stage logged under its own step
numbers are kept, and a run directory that was lost gets its records back from the checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from helpers.tiny_run import train_args

from wmtp.cli import main
from wmtp.config import Tracking
from wmtp.runtime.tracking import METRICS_FILE, RECORDS_DIR, RUN_FILE, Tracker, restore_records

STEPS = {"train": {"max_steps": 6}}
EVERY_2 = {"checkpoint": {"every_steps": 2, "keep_last": 2}}


def lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def train_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in lines(run_dir) if "train/loss" in r]


def test_a_resume_from_an_earlier_checkpoint_logs_each_step_once(tmp_path, capsys):
    args = train_args(tmp_path, "r", config=EVERY_2, recipe=STEPS)
    assert main(args) == 0, capsys.readouterr().err
    run_dir = tmp_path / "runs" / "r"
    assert train_steps(run_dir) == [1, 2, 3, 4, 5, 6]
    first = lines(run_dir)
    params = json.loads((run_dir / RUN_FILE).read_text())["params"]
    # the run as if stopped after step 6 with step 4 its last checkpoint: the resumed run trains 5 and 6 again
    assert main([*args[:-2], "--resume", str(run_dir / "checkpoints" / "step-00000004")]) == 0, \
        capsys.readouterr().err
    assert train_steps(run_dir) == [1, 2, 3, 4, 5, 6]
    again = lines(run_dir)
    assert again[:5] == first[:5]  # the initial evaluation (step 0) and steps 1-4: the first run's lines, kept
    assert json.loads((run_dir / RUN_FILE).read_text())["params"] == params


def test_the_records_continue_from_the_checkpoint_a_first_stage_included(tmp_path):
    """A scheme's first stage logs under its own step numbers (the critic's stage 1: 10, 20, ...) before step 0 of
    training: a resume from step 2 keeps those lines although their steps are larger."""
    run_dir = tmp_path / "run"
    tracker = Tracker(Tracking(enabled=False), tmp_path, "run", active=True, record_dir=run_dir)
    tracker.log_params({"recipe.optim.lr": "0.001"})
    for step in (10, 20):
        tracker.log_metrics({"critic_pretrain/train_value_loss": 1.0 / step}, step)
    tracker.log_metrics({"val/loss_initial": 3.0}, 0)
    for step in (1, 2):
        tracker.log_metrics({"train/loss": float(step)}, step)
    checkpoint = tmp_path / "checkpoints" / "step-00000002"
    for name, path in tracker.record_files().items():  # what save_checkpoint copies into the checkpoint
        (checkpoint / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, checkpoint / name)
    for step in (3, 4):  # logged after the checkpoint by the run that then stopped
        tracker.log_metrics({"train/loss": float(step)}, step)
    tracker.end("STOPPED")

    resumed = Tracker(Tracking(enabled=False), tmp_path, "run", active=True, record_dir=run_dir,
                      resumed_from=checkpoint)
    for step in (3, 4):
        resumed.log_metrics({"train/loss": float(step)}, step)
    resumed.end()
    assert [r["step"] for r in lines(run_dir)] == [10, 20, 0, 1, 2, 3, 4]
    record = json.loads((run_dir / RUN_FILE).read_text())
    assert record["params"] == {"recipe.optim.lr": "0.001"} and record["status"] == "FINISHED"


def test_a_lost_run_directory_gets_its_records_back_from_the_checkpoint(tmp_path):
    checkpoint = tmp_path / "elsewhere" / "step-00000004"
    (checkpoint / RECORDS_DIR).mkdir(parents=True)
    (checkpoint / RECORDS_DIR / RUN_FILE).write_text(json.dumps({"name": "x", "params": {"a": "1"}}))
    (checkpoint / RECORDS_DIR / METRICS_FILE).write_text('{"step": 4, "train/loss": 1.0}\n')
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / METRICS_FILE).write_text('{"step": 9, "train/loss": 2.0}\n')  # a newer local file is kept
    assert restore_records(checkpoint, run_dir) == [RUN_FILE]
    assert json.loads((run_dir / RUN_FILE).read_text())["params"] == {"a": "1"}
    assert (run_dir / METRICS_FILE).read_text() == '{"step": 9, "train/loss": 2.0}\n'
    assert restore_records(tmp_path / "no-records", run_dir) == []
