"""Tracking: two runs that start at the same moment on a fresh local store both get their MLflow run."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

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
