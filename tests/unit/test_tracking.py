"""Tracking: two runs that start at the same moment on a fresh local store both get their MLflow run; TensorBoard's
event files (appending to a closed directory, resumed runs, histograms)."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest

from wmtp.config import Tracking


def _start(output_dir: str, name: str, barrier, results) -> None:
    from wmtp.runtime.tracking import Tracker

    barrier.wait()  # every process opens the fresh store at once
    try:
        tracker = Tracker(Tracking(experiment="race"), Path(output_dir), name, active=True)
        tracker.end()
        results.put((name, tracker.run_id))
    except Exception as exc:  # reported to the test, which names it
        results.put((name, f"error: {type(exc).__name__}: {exc}"))


def test_runs_starting_together_on_a_fresh_store_all_start(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    ctx = mp.get_context("spawn")
    n = 4
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_start, args=(str(tmp_path), f"run{i}", barrier, results)) for i in range(n)]
    for proc in procs:
        proc.start()
    got = dict(results.get(timeout=240) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
    errors = {name: value for name, value in got.items() if value is None or value.startswith("error")}
    assert not errors, errors
    assert len(set(got.values())) == n  # n distinct MLflow runs

    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("race")
    assert len(client.search_runs([experiment.experiment_id])) == n


def test_scalars_appended_to_a_closed_tensorboard_directory_join_its_events(tmp_path):
    """`wmtp execute`'s pass@k goes into the evaluation's TensorBoard directory beside what `wmtp eval` wrote."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from wmtp.runtime.tracking import Tracker, append_scalars

    board = tmp_path / "ev" / "tensorboard"
    tracker = Tracker(Tracking(), tmp_path, "ev", active=True, backends=["tensorboard"], tensorboard_dir=board)
    tracker.log_metrics({"eval/ce_head0": 2.5}, step=0)
    tracker.end()
    append_scalars(board, {"eval/mbpp/pass_at_1": 0.25}, step=0)
    accumulator = EventAccumulator(str(board))
    accumulator.Reload()
    assert {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]} == {
        "eval/ce_head0": [(0, 2.5)], "eval/mbpp/pass_at_1": [(0, 0.25)]}
    assert not (tmp_path / "mlflow.db").exists()


def test_a_resumed_tensorboard_directory_shows_the_checkpoints_metrics_once(tmp_path):
    """A resume from the checkpoint of step 2 hides what the stopped run logged after it (step 3) and keeps what the
    checkpoint's metrics.jsonl holds, a stage's own larger step counter (critic stage 1's step 10) included."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from wmtp.runtime.tracking import METRICS_FILE, RECORDS_DIR, Tracker

    run_dir, checkpoint = tmp_path / "run", tmp_path / "run" / "checkpoints" / "step-00000002"
    stopped = Tracker(Tracking(), tmp_path, "run", active=True, backends=["tensorboard"], record_dir=run_dir)
    for step, metrics in ((10, {"stage1/loss": 0.5}), (1, {"train/loss": 3.0}), (2, {"train/loss": 2.0})):
        stopped.log_metrics(metrics, step)
    (checkpoint / RECORDS_DIR).mkdir(parents=True)
    (checkpoint / RECORDS_DIR / METRICS_FILE).write_text((run_dir / METRICS_FILE).read_text())
    stopped.log_metrics({"train/loss": 1.5}, 3)
    stopped.end("STOPPED")
    resumed = Tracker(Tracking(), tmp_path, "run", active=True, backends=["tensorboard"], record_dir=run_dir,
                      resumed_from=checkpoint, start_step=2)
    resumed.log_metrics({"train/loss": 1.0}, 3)
    resumed.end()
    accumulator = EventAccumulator(str(run_dir / "tensorboard"))
    accumulator.Reload()
    assert {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]} == {
        "stage1/loss": [(10, 0.5)], "train/loss": [(1, 3.0), (2, 2.0), (3, 1.0)]}


def test_histograms_span_their_filled_bins_and_an_empty_one_is_left_out(tmp_path):
    """TensorBoard draws a histogram's buckets from `min` (the first filled bin's left edge) to `max` (the last
    filled bin's right edge); sum and sum of squares at the bin centres."""
    from tensorboard.backend.event_processing.event_accumulator import HISTOGRAMS, EventAccumulator

    from wmtp.runtime.tracking import Histogram, Tracker

    edges = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    tracker = Tracker(Tracking(), tmp_path, "h", active=True, backends=["tensorboard"], tensorboard_dir=tmp_path)
    tracker.log_histograms({"w/head0": Histogram(edges, [0, 0, 3, 1, 0]), "w/head1": Histogram(edges, [0] * 5)}, 7)
    tracker.end()
    accumulator = EventAccumulator(str(tmp_path), size_guidance={HISTOGRAMS: 0})
    accumulator.Reload()
    assert accumulator.Tags()[HISTOGRAMS] == ["w/head0"]
    (event,) = accumulator.Histograms("w/head0")
    value = event.histogram_value
    assert event.step == 7 and (value.min, value.max, value.num) == (2.0, 4.0, 4.0)
    assert list(value.bucket_limit) == edges[1:] and list(value.bucket) == [0, 0, 3, 1, 0]
    assert (value.sum, value.sum_squares) == (3 * 2.5 + 3.5, 3 * 2.5**2 + 3.5**2)


def test_appending_without_the_tensorboard_package_is_one_line_naming_the_directory(tmp_path, monkeypatch):
    import builtins

    from wmtp.config import ConfigError
    from wmtp.runtime.tracking import append_scalars

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "tensorboard" or name.startswith("tensorboard."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ConfigError, match=r"tensorboard package: pip install tensorboard") as raised:
        append_scalars(tmp_path / "tensorboard", {"eval/x": 1.0}, step=0)
    assert str(tmp_path / "tensorboard") in str(raised.value) and "\n" not in str(raised.value)
