"""A run whose `output_dir` is a storage URL (`s3://bucket/runs`): written locally, uploaded in the background.

The run directory lives in a local staging directory (`storage.staging_dir`, default `$WMTP_CACHE/runs`) and is
mirrored to `<output_dir>/<run name>`:
- every checkpoint, once saved locally, is queued for upload. Each rank uploads the files it wrote itself (its
  `state/__<rank>_*.distcp` shards and `rng-rank<rank>.json`) and then a marker `_UPLOADED-rank<rank>`; rank 0
  uploads the rest, waits for every rank's marker, and writes `_COMPLETE.json` (the file list with sizes) last.
  A checkpoint counts as saved remotely only when `_COMPLETE.json` exists; `--resume auto` never picks another.
- an upload that fails is retried with exponential backoff (`storage.upload_retries`,
  `storage.retry_backoff_seconds`); when the retries are spent the run stops at its next step with an error naming
  the checkpoint and the URL, and that checkpoint is not marked complete.
- local disk stays bounded: at most `checkpoint.keep_last` checkpoints wait for upload (a save waits for the
  queue), and a local checkpoint is deleted once `keep_last` newer ones exist and it is complete remotely. The
  remote side keeps `keep_last` complete checkpoints too.
- the checkpoint's copy of the run's records (`records/`: run.json, metrics.jsonl, config.yaml, recipe.yaml as of
  its step) is copied to the run's top level once the checkpoint is complete, so the store holds the run's
  parameters and metrics even when the machine is lost before the end.
- the final model (`final/`, with its own `_COMPLETE.json`) and the run's other files are uploaded at the end,
  the records last, after the run's status is final; the run returns only when every upload is done.

Resuming (`--resume auto`) lists the remote run and downloads its latest complete checkpoint (checking each file's
size against the marker) unless a newer one is already on local disk, so a run whose machine is lost continues on
another machine, its records (params, every step's metrics) continued from the checkpoint's copy. Credentials
come from the storage library's standard chain; nothing here prints one.
"""

from __future__ import annotations

import hashlib
import json
import queue
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..config import ConfigError
from .storage import WORKERS, StorageError, cache_root, download_files, endpoint_of, explain, is_remote
from .tracking import RECORD_FILES, RECORDS_DIR

COMPLETE = "_COMPLETE.json"
RANK_MARKER = "_UPLOADED-rank{rank}"
CHECKPOINTS = "checkpoints"
FINAL = "final"
_STEP = re.compile(r"^step-\d{8}$")
_RANK_FILE = re.compile(r"^(?:state/__(\d+)_\d+\.distcp|rng-rank(\d+)\.json)$")


def writer_rank(rel: str) -> int:
    """The rank that wrote a checkpoint file (by its name: DCP's per-rank shards, the per-rank RNG state); every
    other file is rank 0's."""
    match = _RANK_FILE.match(rel)
    return int(match.group(1) or match.group(2)) if match else 0


def staging_dir(output_dir: str, staging: str | None) -> Path:
    """The local directory that stands for a remote `output_dir` (one per URL)."""
    base = Path(staging) if staging else cache_root() / "runs"
    return base / hashlib.sha256(output_dir.rstrip("/").encode()).hexdigest()[:16]


def local_output_dir(output_dir: str, staging: str | None) -> Path:
    """Where runs are written on this machine: `output_dir` itself, or its staging directory when it is remote."""
    return staging_dir(output_dir, staging) if is_remote(output_dir) else Path(output_dir)


def _filesystem(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url)


def check_writable(url: str, what: str = "output_dir") -> None:
    """Fail before training when `url` cannot be written, saying which of these it is: the store not reached (no
    network, a wrong endpoint), a missing bucket, refused credentials, or the storage library not installed.
    Writes and removes one small probe object."""
    try:
        fs, root = _filesystem(url)
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"{what} {url}: {explain(exc)} (for s3:// install wmtp[s3])") from None
    bucket = root.strip("/").split("/")[0]
    probe = f"{root.rstrip('/')}/.wmtp-write-probe"
    endpoint = endpoint_of(fs)
    try:
        fs.pipe_file(probe, b"wmtp")
        fs.rm_file(probe)
    except FileNotFoundError:  # the storage libraries' missing bucket (s3fs: NoSuchBucket)
        where = f" at {endpoint}" if endpoint else ""
        raise ConfigError(f"{what} {url}: bucket `{bucket}` does not exist{where}; create it or correct {what}") \
            from None
    except Exception as exc:
        raise ConfigError(f"{what} {url}: {explain(exc, endpoint)}") from None


def remote_checkpoints(run_url: str) -> list[tuple[int, str, dict]]:
    """The remote run's complete checkpoints as (step, URL, marker), oldest first."""
    fs, root = _filesystem(run_url)
    base = f"{root.rstrip('/')}/{CHECKPOINTS}"
    fs.invalidate_cache(base)
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(base, detail=False)]
    except FileNotFoundError:
        return []
    found = []
    for name in sorted(n for n in names if _STEP.match(n)):
        try:
            marker = json.loads(fs.cat_file(f"{base}/{name}/{COMPLETE}"))
        except FileNotFoundError:
            continue  # not complete: an upload that was cut short
        found.append((int(name.split("-")[1]), f"{run_url.rstrip('/')}/{CHECKPOINTS}/{name}", marker))
    return found


def download_checkpoint(url: str, marker: dict, destination: Path) -> Path:
    """Download a complete remote checkpoint to `destination` (filled under a hidden name, renamed at the end)."""
    fs, root = _filesystem(url)
    partial = destination.with_name(f".{destination.name}.partial")
    files = marker["files"]
    download_files(fs, {rel: f"{root.rstrip('/')}/{rel}" for rel in files},
                   {rel: {"size": size} for rel, size in files.items()}, partial, f"--resume {url}")
    if destination.exists():
        shutil.rmtree(destination)
    partial.rename(destination)
    return destination


class RunMirror:
    """Uploads one rank's share of a local run directory to `url` on a background thread."""

    def __init__(self, local: Path, url: str, *, rank: int, world_size: int, keep_last: int, retries: int,
                 backoff_seconds: float, wait_seconds: float = 1800.0) -> None:
        self.local, self.url = local, url.rstrip("/")
        self.rank, self.world_size, self.keep_last = rank, world_size, keep_last
        self.retries, self.backoff, self.wait_seconds = retries, backoff_seconds, wait_seconds
        self.fs, self.root = _filesystem(self.url)
        self.root = self.root.rstrip("/")
        self.error: str | None = None
        self._jobs: queue.Queue = queue.Queue(maxsize=keep_last)
        self._thread = threading.Thread(target=self._work, name="wmtp-upload", daemon=True)
        self._thread.start()

    # the trainer's side -------------------------------------------------------------------------------------
    def checkpoint(self, directory: Path) -> None:
        """Queue a checkpoint saved locally (blocks while `keep_last` uploads are already waiting)."""
        self._put(("checkpoint", directory))

    def final(self, directory: Path) -> None:
        """Queue the final model (rank 0)."""
        self._put(("final", directory))

    def failed(self) -> bool:
        return self.error is not None

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise StorageError(self.error)

    def close(self) -> None:
        """Upload the run's remaining files (rank 0), wait for every upload, and raise if one failed."""
        if self.rank == 0:
            self._put(("rest", self.local))
        self._put(None)
        self._thread.join()
        self.raise_if_failed()

    def _put(self, job) -> None:
        while self._thread.is_alive():
            try:
                self._jobs.put(job, timeout=0.5)
                return
            except queue.Full:
                continue

    # the upload thread --------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            kind, directory = job
            what = {"checkpoint": f"checkpoint {directory.name}", "final": "the final model",
                    "rest": "the run's files"}[kind]
            try:
                {"checkpoint": self._checkpoint, "final": self._final, "rest": self._rest}[kind](directory, what)
            except Exception as exc:  # spent retries or a failed wait: the trainer stops at its next step
                self.error = str(exc) if isinstance(exc, StorageError) else \
                    f"uploading {what} to {self.url}: {explain(exc, endpoint_of(self.fs))}"
                return

    def _retry(self, what: str, action) -> None:
        for attempt in range(self.retries + 1):
            try:
                action()
                return
            except Exception as exc:
                if attempt == self.retries:
                    raise StorageError(f"uploading {what} to {self.url}: failed after {attempt + 1} tries: "
                                       f"{explain(exc, endpoint_of(self.fs))}") from None
                time.sleep(self.backoff * 2 ** attempt)
                self.fs.invalidate_cache()

    def _upload(self, directory: Path, remote: str, files: list[str], what: str) -> None:
        def put(rel: str) -> None:
            self._retry(f"{what} ({rel})", lambda: self.fs.put_file(str(directory / rel), f"{remote}/{rel}"))

        with ThreadPoolExecutor(max_workers=max(1, min(WORKERS, len(files)))) as pool:
            list(pool.map(put, files))

    @staticmethod
    def _files(directory: Path) -> list[str]:
        return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())

    def _mark(self, remote: str, name: str, content: dict, what: str) -> None:
        data = json.dumps(content, indent=1).encode()
        self._retry(f"{what} ({name})", lambda: self.fs.pipe_file(f"{remote}/{name}", data))

    def _checkpoint(self, directory: Path, what: str) -> None:
        remote = f"{self.root}/{CHECKPOINTS}/{directory.name}"
        files = self._files(directory)
        mine = [f for f in files if writer_rank(f) == self.rank]
        self._upload(directory, remote, mine, what)
        if self.rank != 0:
            self._mark(remote, RANK_MARKER.format(rank=self.rank), {"files": mine}, what)
            self._retry(f"{what} (then removing older local checkpoints)", lambda: self._prune_local(None))
            return
        self._wait_for_ranks(remote, what)
        sizes = {}
        for f in files:  # rank 0 sees the others' files only on a shared disk: list the remote copy for sizes
            path = directory / f
            if path.is_file():
                sizes[f] = path.stat().st_size
        for r in range(1, self.world_size):
            marker = json.loads(self.fs.cat_file(f"{remote}/{RANK_MARKER.format(rank=r)}"))
            for f in marker["files"]:
                if f not in sizes:
                    sizes[f] = self.fs.info(f"{remote}/{f}")["size"]
        step = int(directory.name.split("-")[1])
        self._mark(remote, COMPLETE, {"step": step, "files": sizes}, what)
        self._publish_records(remote, sorted(f for f in sizes if f.startswith(f"{RECORDS_DIR}/")), what)
        self._retry(f"{what} (then removing older checkpoints)", self._prune_remote)
        self._retry(f"{what} (then removing older local checkpoints)", lambda: self._prune_local(step))

    def _publish_records(self, remote: str, records: list[str], what: str) -> None:
        """Copy the checkpoint's records (run.json, metrics.jsonl, ...) to the run's top level in the store, where
        they stand for the run as of its newest complete checkpoint even if the machine is lost before the end. A
        copy inside the store: nothing is uploaded twice."""
        for rel in records:
            name = rel.split("/", 1)[1]
            self._retry(f"{what} (then the run's {name})",
                        lambda rel=rel, name=name: self.fs.copy(f"{remote}/{rel}", f"{self.root}/{name}"))

    def _wait_for_ranks(self, remote: str, what: str) -> None:
        deadline = time.monotonic() + self.wait_seconds
        for r in range(1, self.world_size):
            marker = f"{remote}/{RANK_MARKER.format(rank=r)}"
            while True:
                self.fs.invalidate_cache(remote)
                if self.fs.exists(marker):
                    break
                if time.monotonic() > deadline:
                    raise StorageError(f"uploading {what} to {self.url}: rank {r} did not finish its upload in "
                                       f"{self.wait_seconds:.0f} s")
                time.sleep(0.5)

    def _final(self, directory: Path, what: str) -> None:
        files = self._files(directory)
        remote = f"{self.root}/{FINAL}"
        self._upload(directory, remote, files, what)
        self._mark(remote, COMPLETE, {"files": {f: (directory / f).stat().st_size for f in files}}, what)

    def _rest(self, directory: Path, what: str) -> None:
        files = [f for f in self._files(directory) if f.split("/")[0] not in (CHECKPOINTS, FINAL)
                 and f not in RECORD_FILES]  # the records go last (upload_records), once their status is final
        self._upload(directory, self.root, files, what)

    def upload_records(self) -> None:
        """Upload the run's records (run.json with its final status, metrics.jsonl, config.yaml, recipe.yaml) after
        the tracker has ended the run and every other upload is done (rank 0; other ranks have none)."""
        if self.rank != 0:
            return
        self._upload(self.local, self.root, [f for f in RECORD_FILES if (self.local / f).is_file()],
                     "the run's records")

    def _prune_local(self, newest_complete: int | None) -> None:
        """Delete local checkpoints older than the newest `keep_last`, up to the newest one complete remotely (rank 0
        uploads in order, so every older one is complete or abandoned and no longer read by an upload). Rank 0
        passes the step it has just marked complete; another rank asks the store."""
        root = self.local / CHECKPOINTS
        if newest_complete is None:
            complete = remote_checkpoints(self.url)
            newest_complete = complete[-1][0] if complete else None
        if not root.is_dir() or newest_complete is None:
            return
        local = sorted(p for p in root.iterdir() if p.is_dir() and _STEP.match(p.name))
        for old in local[:-self.keep_last]:
            if int(old.name.split("-")[1]) <= newest_complete:
                shutil.rmtree(old, ignore_errors=True)

    def _prune_remote(self) -> None:
        """Keep the newest `keep_last` complete remote checkpoints; remove older ones and the leftovers of uploads
        that never completed (their marker first, so a half-deleted checkpoint is never complete)."""
        base = f"{self.root}/{CHECKPOINTS}"
        self.fs.invalidate_cache(base)
        complete = remote_checkpoints(self.url)
        if not complete:
            return
        keep = {url.rsplit("/", 1)[-1] for _, url, _ in complete[-self.keep_last:]}
        newest = complete[-1][0]
        for path in self.fs.ls(base, detail=False):
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if _STEP.match(name) and name not in keep and int(name.split("-")[1]) < newest:
                if self.fs.exists(f"{path}/{COMPLETE}"):
                    self.fs.rm_file(f"{path}/{COMPLETE}")
                self.fs.rm(path, recursive=True)


def latest_checkpoint(local_run: Path, run_url: str, local_complete: list[Path]) -> Path | None:
    """The newest complete checkpoint of a mirrored run: the local one when it is at least as new as the remote
    one, otherwise the remote one downloaded into the local run directory."""
    try:
        remote = remote_checkpoints(run_url)
    except Exception as exc:
        raise ConfigError(f"--resume auto: cannot list {run_url}: {explain(exc)}") from None
    local = local_complete[-1] if local_complete else None
    if not remote or (local is not None and int(local.name.split("-")[1]) >= remote[-1][0]):
        return local
    _, url, marker = remote[-1]
    return download_checkpoint(url, marker, local_run / CHECKPOINTS / url.rsplit("/", 1)[-1])


def remote_run_exists(run_url: str) -> bool:
    fs, root = _filesystem(run_url)
    fs.invalidate_cache(root)
    return fs.exists(root) and bool(fs.ls(root, detail=False))

