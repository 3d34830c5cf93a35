"""`tracking.backends: [mlflow, tensorboard]` on a tiny run: TensorBoard's event files, read back with its own
EventAccumulator, hold what metrics.jsonl holds (names, steps, values), the weighting scheme's per-head weight
histograms, an evaluation's metrics, and a resumed run's steps once each."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers.tiny_run import files, train_args
from tensorboard.backend.event_processing.event_accumulator import HISTOGRAMS, SCALARS, EventAccumulator

from wmtp.cli import main
from wmtp.evaluate.checkpoint_eval import flat_metrics


def events(log_dir: Path) -> EventAccumulator:
    """Every event file of the directory, all their events kept (purged ones left out, as TensorBoard shows it)."""
    accumulator = EventAccumulator(str(log_dir), size_guidance={SCALARS: 0, HISTOGRAMS: 0})
    accumulator.Reload()
    return accumulator


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    accumulator = events(log_dir)
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()[SCALARS]}


def logged(metrics_file: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl by name, as TensorBoard stores the values (float32)."""
    by_name: dict[str, list[tuple[int, float]]] = {}
    for line in metrics_file.read_text().splitlines():
        record = json.loads(line)
        step = record.pop("step")
        for name, value in record.items():
            by_name.setdefault(name, []).append((step, float(np.float32(value))))
    return by_name


def test_tensorboard_beside_mlflow_holds_the_metrics_histograms_and_evaluation(tmp_path):
    from mlflow import MlflowClient

    config = {"mlflow": {"enabled": True}, "tracking": {"backends": ["mlflow", "tensorboard"]}}
    recipe = {"algorithm": "dpace", "train": {"max_steps": 3}}
    assert main(train_args(tmp_path, config=config, recipe=recipe)) == 0
    run = tmp_path / "runs" / "run"
    board = scalars(run / "tensorboard")
    assert board == logged(run / "metrics.jsonl")
    assert {"train/loss", "val/loss", "val/loss_initial", "dpace/weight_mean_head1", "train/ce_head2"} <= set(board)
    mlflow_run = json.loads((run / "run.json").read_text())["mlflow_run_id"]
    history = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}").get_metric_history(mlflow_run, "train/loss")
    assert [(m.step, float(np.float32(m.value))) for m in history] == board["train/loss"]

    # each logged step's histogram of every head's weights; over the steps, what the run's histogram file sums
    accumulator = events(run / "tensorboard")
    saved = json.loads((run / "dpace_weight_histogram.json").read_text())
    assert sorted(accumulator.Tags()[HISTOGRAMS]) == [f"dpace/weights_head{h}" for h in range(3)]
    for h, counts in enumerate(saved["counts_per_head"]):
        steps = accumulator.Histograms(f"dpace/weights_head{h}")
        assert [e.step for e in steps] == [1, 2, 3]
        assert np.array_equal(np.sum([e.histogram_value.bucket for e in steps], axis=0), counts)
        for e in steps:
            value = e.histogram_value
            assert list(value.bucket_limit) == pytest.approx(saved["bin_edges"][1:])
            filled = np.flatnonzero(value.bucket)
            assert (value.min, value.max) == pytest.approx((saved["bin_edges"][filled[0]],
                                                            saved["bin_edges"][filled[-1] + 1]))
            assert value.num == sum(value.bucket) > 0

    # an evaluation of the final model: its metrics in its own directory's event files, at step 0
    config_path, recipe_path = files(tmp_path, config=config, recipe=recipe)
    out = tmp_path / "ev"
    assert main(["eval", "--config", str(config_path), "--recipe", str(recipe_path), "--checkpoint",
                 str(run / "final"), "--benchmarks", "", "--out", str(out)]) == 0
    expected = flat_metrics(json.loads((out / "results.json").read_text()))
    assert "eval/ce_head1" in expected
    assert scalars(out / "tensorboard") == {k: [(0, float(np.float32(v)))] for k, v in expected.items()}


def test_tensorboard_alone_and_a_resume_keep_each_step_once(tmp_path):
    config = {"tracking": {"backends": ["tensorboard"]}, "mlflow": {"enabled": True},
              "checkpoint": {"every_steps": 2, "keep_last": 5}}
    recipe = {"train": {"max_steps": 4}}
    args = train_args(tmp_path, config=config, recipe=recipe)
    assert main(args) == 0
    run = tmp_path / "runs" / "run"
    first = scalars(run / "tensorboard")
    assert not (tmp_path / "runs" / "mlflow.db").exists()
    assert json.loads((run / "run.json").read_text())["mlflow_run_id"] is None
    # as if the run had stopped after step 4 before its last checkpoint: the resume starts from step 2
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    assert main([*args, "--resume", "auto"]) == 0
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2
    board = scalars(run / "tensorboard")
    assert board == logged(run / "metrics.jsonl")
    assert [step for step, _ in board["train/loss"]] == [1, 2, 3, 4]
    assert board["train/loss"][:2] == first["train/loss"][:2]
