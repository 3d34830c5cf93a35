"""Tracking (MLflow, TensorBoard), the run's own record, and console progress. Only rank 0 tracks; other ranks get a
tracker that does nothing.

`tracking.backends` names the trackers: `mlflow` (the `mlflow:` section's store) and `tensorboard` (event files in
`<run_dir>/tensorboard`, `tensorboard --logdir <output_dir>`: the same metric names and steps as MLflow, plus
the weighting schemes' per-head weight histograms). Besides them, a training run keeps its own record in its
directory, readable without either:
`run.json` (name, parameters, status) and `metrics.jsonl` (one line per logged step: {"step": s, name: value}).
`wmtp compare` reads either. Every checkpoint keeps a copy of these records (and of the run's config.yaml and
recipe.yaml) as they were at its step, in `records/`; a run resumed from it continues that copy of
metrics.jsonl, so the records hold every step once, and a run directory that was lost (a machine resuming from
object storage) gets its records back (`restore_records`).

A resumed run appends to the same TensorBoard directory (a new event file) and hides what the stopped run logged
after its checkpoint's step (`purge_step`), as it does for metrics.jsonl (a line of the checkpoint's copy past that
step, from critic stage 1's own step counter, is written again); a fresh start hides everything before.

By default the MLflow store is a local sqlite file shared by all runs under the output directory
(`<output_dir>/mlflow.db`, artifacts in `<output_dir>/mlartifacts`), so runs can be compared side by side
with `mlflow ui --backend-store-uri sqlite:///<output_dir>/mlflow.db`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from ..config import RUN_CONFIG_FILE, RUN_RECIPE_FILE, Config, ConfigError, Tracking
from .atomic import atomic_file


def tracking_uri(settings: Tracking, output_dir: Path) -> str:
    return settings.tracking_uri or f"sqlite:///{output_dir.resolve() / 'mlflow.db'}"


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock beside a local sqlite store while it is opened: MLflow creates the tables (and a run
    its experiment) on first use, and two runs that start at the same moment on a fresh store would both try
    (`table params already exists`). Other stores need no lock."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_backends(config: Config) -> None:
    """The packages `tracking.backends` needs are installed (set-up and `wmtp eval` call this before any work)."""
    if "tensorboard" in config.tracking.backends:
        try:
            import tensorboard  # noqa: F401  (torch.utils.tensorboard writes with it)
        except ImportError:
            raise ConfigError(f"{config.where('tracking.backends')}: tracking.backends: tensorboard needs the "
                              "tensorboard package: pip install tensorboard") from None


def describe_tracking(config: Config, run_dir: Path) -> str:
    """Where a run's metrics go, for the lines a run prints before its first step."""
    where = []
    if "mlflow" in config.tracking.backends and config.mlflow.enabled:
        where.append(f"MLflow {tracking_uri(config.mlflow, run_dir.parent)}")
    if "tensorboard" in config.tracking.backends:
        where.append(f"TensorBoard {run_dir / TENSORBOARD_DIR}")
    return ", ".join(where) or "run.json and metrics.jsonl only"


def append_scalars(log_dir: Path, metrics: dict[str, float], step: int) -> None:
    """Scalars added to a TensorBoard directory a tracker wrote and closed (`wmtp execute`'s pass@k to its
    evaluation's): a new event file beside the others, nothing hidden."""
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard writes with it)
    except ImportError:
        raise ConfigError(f"{log_dir}: this evaluation's TensorBoard events get its pass@k, which needs the "
                          "tensorboard package: pip install tensorboard") from None
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(log_dir)) as writer:
        for name, value in metrics.items():
            writer.add_scalar(name, float(value), step)


class Histogram(NamedTuple):
    """Counts of values in bins: bin_edges [K + 1] ascending, counts [K] (values outside the edges not counted)."""

    bin_edges: list[float]
    counts: list[float]


RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
RECORDS_DIR = "records"  # a checkpoint's copy of the run's records as of its step
TENSORBOARD_DIR = "tensorboard"  # a run's (and an evaluation's) TensorBoard event files, in its directory
RECORD_FILES = (RUN_FILE, METRICS_FILE, RUN_CONFIG_FILE, RUN_RECIPE_FILE)


def restore_records(checkpoint: Path, run_dir: Path) -> list[str]:
    """Copy the records a checkpoint keeps into `run_dir` where the run directory has lost them (a run resumed on
    another machine from object storage); returns the names copied. Files still there are kept: metrics.jsonl is
    continued from the checkpoint's copy by the resumed run's Tracker, the others do not change during a run."""
    restored = []
    for name in RECORD_FILES:
        saved = checkpoint / RECORDS_DIR / name
        if saved.is_file() and not (run_dir / name).is_file():
            with atomic_file(run_dir / name) as tmp:
                shutil.copyfile(saved, tmp)
            restored.append(name)
    return restored


class Tracker:
    def __init__(self, settings: Tracking, output_dir: Path, run_name: str, *, active: bool,
                 backends: Sequence[str] = ("mlflow",), tags: dict[str, str] | None = None,
                 resume_run_id: str | None = None, record_dir: Path | None = None, resumed_from: Path | None = None,
                 start_step: int = 0, tensorboard_dir: Path | None = None) -> None:
        """`backends`: `tracking.backends` (MLflow only where `settings.enabled` too). `resumed_from`: the
        checkpoint a resumed run starts from, at `start_step`; its copy of metrics.jsonl replaces the run's,
        dropping the lines the stopped run logged after that step (the resumed run logs those steps again), and
        TensorBoard hides that run's events after it. `tensorboard_dir`: where the event files go (default
        `record_dir/tensorboard`)."""
        self.uses_mlflow = active and settings.enabled and "mlflow" in backends
        self.run_id: str | None = None
        self.tracking_uri: str | None = None
        self.record_dir = record_dir if active else None  # run.json and metrics.jsonl (rank 0)
        self.writer = None  # TensorBoard's SummaryWriter (rank 0, with the backend)
        self.tensorboard_dir: Path | None = None
        if self.record_dir is not None:
            if resumed_from is not None:
                self._continue_metrics(resumed_from / RECORDS_DIR)
            self._update_record(name=run_name, status="RUNNING", **({"tags": tags} if tags else {}))
        if active and "tensorboard" in backends:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard_dir = tensorboard_dir or record_dir / TENSORBOARD_DIR
            self.writer = SummaryWriter(str(self.tensorboard_dir),
                                        purge_step=0 if resumed_from is None else start_step + 1)
            if resumed_from is not None and self.record_dir is not None:
                self._relog_past(start_step)
        if not self.uses_mlflow:
            return
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        import mlflow

        self._mlflow = mlflow
        output_dir = output_dir.resolve()
        self.tracking_uri = tracking_uri(settings, output_dir)
        mlflow.set_tracking_uri(self.tracking_uri)
        with store_lock(self.tracking_uri):
            experiment = mlflow.get_experiment_by_name(settings.experiment)
            if experiment is None:
                # a local store keeps its artifacts under output_dir (MLflow's default is ./mlruns in the CWD);
                # a tracking server decides for itself
                local = self.tracking_uri.startswith(("sqlite:", "file:")) or "://" not in self.tracking_uri
                artifacts = settings.artifact_location or ((output_dir / "mlartifacts").as_uri() if local else None)
                experiment_id = mlflow.create_experiment(settings.experiment, artifact_location=artifacts)
            else:
                experiment_id = experiment.experiment_id
        if resume_run_id is not None and not self._known(resume_run_id):
            # a resumed run whose store is gone (a local store on a lost machine): a new run that says so
            tags = {**(tags or {}), "wmtp.resumed_from_run_id": resume_run_id}
            print(f"MLflow run {resume_run_id} is not in {self.tracking_uri}: the resumed run is tracked as a new "
                  "run", file=sys.stderr)
            resume_run_id = None
        run = mlflow.start_run(run_id=resume_run_id, experiment_id=None if resume_run_id else experiment_id,
                               run_name=None if resume_run_id else run_name, tags=tags or None)
        self.run_id = run.info.run_id

    def _known(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self._mlflow.get_run(run_id)
            return True
        except MlflowException:
            return False

    def _continue_metrics(self, saved: Path) -> None:
        """metrics.jsonl as the checkpoint's copy `saved/` has it (absent there: nothing was logged by then). A
        checkpoint written before checkpoints kept records has no `saved/`: the run's file is left as it is."""
        if not saved.is_dir():
            return
        path = self.record_dir / METRICS_FILE
        if not (saved / METRICS_FILE).is_file():
            path.unlink(missing_ok=True)
            return
        with atomic_file(path) as tmp:
            shutil.copyfile(saved / METRICS_FILE, tmp)

    def _relog_past(self, step: int) -> None:
        """The continued metrics.jsonl's lines past `step` (a stage on its own step counter, critic stage 1, logged
        them before the checkpoint), which the purge hid, to TensorBoard again."""
        path = self.record_dir / METRICS_FILE
        for line in path.read_text().splitlines() if path.is_file() else []:
            record = json.loads(line)
            if record["step"] > step:
                for name, value in record.items():
                    if name != "step":
                        self.writer.add_scalar(name, value, record["step"])

    def record_files(self) -> dict[str, Path]:
        """The run's records as they are now, by the name a checkpoint keeps them under (`records/metrics.jsonl`,
        ...): what `save_checkpoint` copies so that a resume continues them. Empty on ranks other than 0."""
        if self.record_dir is None:
            return {}
        return {f"{RECORDS_DIR}/{name}": self.record_dir / name for name in RECORD_FILES
                if (self.record_dir / name).is_file()}

    def _update_record(self, **fields) -> None:
        path = self.record_dir / RUN_FILE
        record = json.loads(path.read_text()) if path.is_file() else {}
        record.update(fields)
        self.record_dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(record, indent=1))

    def log_params(self, params: dict[str, str]) -> None:
        if self.record_dir is not None:
            self._update_record(params=params)
        if self.uses_mlflow:
            items = list(params.items())
            for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
                self._mlflow.log_params({k: v[:6000] for k, v in items[i:i + 100]})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.record_dir is not None:
            with (self.record_dir / METRICS_FILE).open("a") as f:
                f.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")
        if self.uses_mlflow:
            self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(name, float(value), step)

    def log_histograms(self, histograms: dict[str, Histogram], step: int) -> None:
        """Histograms by tag, to TensorBoard only (MLflow has none; the schemes' files keep theirs). An empty one
        is left out. TensorBoard draws the buckets between the first and last non-empty bin's outer edges (given
        as min and max); sum and sum of squares, which it does not draw, are taken at the bin centres."""
        if self.writer is None:
            return
        for tag, (edges, counts) in histograms.items():
            filled = [i for i, count in enumerate(counts) if count > 0]
            if not filled:
                continue
            centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:], strict=True)]
            self.writer.add_histogram_raw(
                tag, min=edges[filled[0]], max=edges[filled[-1] + 1], num=sum(counts),
                sum=sum(c * x for c, x in zip(counts, centres, strict=True)),
                sum_squares=sum(c * x * x for c, x in zip(counts, centres, strict=True)),
                bucket_limits=edges[1:], bucket_counts=counts, global_step=step)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.uses_mlflow:
            self._mlflow.set_tags(tags)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.uses_mlflow:
            if path.is_dir():
                self._mlflow.log_artifacts(str(path), artifact_path=artifact_path)
            else:
                self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def flush(self) -> None:
        """Write TensorBoard's buffered events to disk (before a remote run's directory is uploaded)."""
        if self.writer is not None:
            self.writer.flush()

    def end(self, status: str = "FINISHED") -> None:
        if self.record_dir is not None:
            self._update_record(status=status, mlflow_run_id=self.run_id, tracking_uri=self.tracking_uri)
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        # MLflow has no status for a stop on request (KILLED reads as lost): FINISHED, and the tag wmtp.status says it
        if self.uses_mlflow:
            self._mlflow.end_run(status="FINISHED" if status == "STOPPED" else status)


class Progress:
    """Console progress on stderr: a tqdm bar when stderr is a terminal, otherwise one plain line every `every`
    steps (a log file gets lines, not carriage returns). The first step (allocation, compilation, warm-up) is
    said with its time and left out of the ETA."""

    def __init__(self, total: int, start: int, *, enabled: bool, active: bool, every: int = 10,
                 stream=None) -> None:
        self.active = active
        self.total = total
        self.every = every
        self.stream = stream or sys.stderr
        self.bar = None
        self.start = start
        self.started = time.monotonic()
        self.timed_from: tuple[int, float] | None = None  # (step, time) the ETA counts from: after the first step
        if active and enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=self.stream)
        self.plain = active and self.bar is None  # logging.progress false: plain lines too

    def update(self, step: int, metrics: dict[str, float], logged: bool) -> None:
        if not self.active:
            return
        now = time.monotonic()
        first = self.timed_from is None
        if first:
            self.timed_from = (step, now)
        if self.bar is not None:
            if first:  # tqdm's rate and ETA count from here on
                self.bar.reset(total=self.total)
                self.bar.initial = step
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", refresh=False)
        line = f"step {step}/{self.total} loss {metrics['train/loss']:.4f} lr {metrics['train/lr']:.2e}"
        if first:
            self.write(f"{line} (took {now - self.started:.1f}s: the first step includes allocation and warm-up; the "
                       "ETA leaves it out)")
        elif self.plain and (logged or step % self.every == 0):
            self.write(f"{line} eta {_duration(self.eta(step, now))}")

    def eta(self, step: int, now: float) -> float:
        """Seconds left at the mean step time since the first step."""
        first, at = self.timed_from
        return (now - at) / max(step - first, 1) * (self.total - step)

    def write(self, line: str) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def quiet_library_progress() -> None:
    """Silence the progress bars transformers and the hub draw while loading and saving ("Loading weights",
    "Writing model shards"): with `logging.progress: false` the logs hold only wmtp's own lines."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    disable_progress_bars()
