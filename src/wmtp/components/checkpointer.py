"""The checkpointer of a run (torchtitan's checkpoint manager, in small): it saves and restores the training state
(checkpoint.py's format), finds the checkpoint to resume from, saves the final model, and, when the run's
`output_dir` is remote, hands each of them to the mirror (runtime/mirror.py) and reports its uploads. The trainer
calls it between steps; no other part of a run knows the mirror.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import torch

from ..config import Checkpointing, ConfigError, Tracking
from ..model.mtp import MTPModel
from ..runtime import distributed as dist_utils
from ..runtime.distributed import DistInfo
from ..runtime.mirror import COMPLETE, RunMirror, download_checkpoint, latest_checkpoint, remote_checkpoints
from ..runtime.storage import StorageError, is_remote
from ..runtime.tracking import Tracker, restore_records
from .checkpoint import (
    STATE_FILE,
    list_checkpoints,
    load_checkpoint,
    remove_partial_checkpoints,
    save_checkpoint,
    save_model,
)


class Checkpointer:
    """Save, restore and the final model of one run directory, for the model, optimizer and scheduler it is given;
    with a `mirror`, every checkpoint and the final model are uploaded too (and old local checkpoints pruned by the
    mirror once uploaded, not here)."""

    def __init__(self, run_dir: Path, model: MTPModel, optimizer: torch.optim.Optimizer, scheduler, tokenizer,
                 info: DistInfo, settings: Checkpointing, mlflow: Tracking, mirror: RunMirror | None = None) -> None:
        self.run_dir, self.model, self.optimizer, self.scheduler = run_dir, model, optimizer, scheduler
        self.tokenizer, self.info, self.settings, self.mlflow, self.mirror = tokenizer, info, settings, mlflow, mirror

    def save(self, step: int, state: dict, scheme_tensors: dict[str, torch.Tensor] | None,
             records: dict[str, Path]) -> Path:
        """The checkpoint of `step` (every rank takes part): the trainer's JSON `state`, the scheme's tensors and
        the run's `records` as of this step (name in the checkpoint -> file); queued for upload with a mirror."""
        path = save_checkpoint(self.run_dir, step, self.model, self.optimizer, self.scheduler, state, self.tokenizer,
                               self.info, self.settings.keep_last, scheme_tensors, prune=self.mirror is None,
                               extra_files=records)
        if self.mirror is not None:
            self.mirror.checkpoint(path)
        return path

    def restore(self, path: Path) -> dict:
        """Model, optimizer, scheduler and this rank's RNG from checkpoint `path`; returns the trainer state (the
        scheme's tensors under `scheme_tensors`)."""
        return load_checkpoint(path, self.model, self.optimizer, self.scheduler, self.info)

    def save_final(self, tracker: Tracker, finish: Callable[[Path], None]) -> Path | None:
        """The final model in `final/` (every rank gathers, rank 0 writes and gets the path): `finish` adds the
        scheme's files, then it is logged to MLflow (within `mlflow.log_model_max_size`) and queued for upload."""
        final = save_model(self.model, self.run_dir / "final", self.tokenizer, self.info,
                           self.settings.max_shard_bytes)
        if final is not None:
            finish(final)
            self._log_model(final, tracker)
            if self.mirror is not None:
                self.mirror.final(final)
        return final

    def _log_model(self, final: Path, tracker: Tracker) -> None:
        """The final model as an MLflow artifact, unless it is larger than `mlflow.log_model_max_size`: then its
        location (the store's, with a mirror) and the reason are tags."""
        if not self.mlflow.log_model:
            return
        size = sum(p.stat().st_size for p in final.rglob("*") if p.is_file())
        if size > self.mlflow.log_model_max_bytes:
            where = f"{self.mirror.url}/final" if self.mirror is not None else str(final.resolve())
            limit = self.mlflow.log_model_max_size
            tracker.set_tags({"wmtp.model_location": where,
                              "wmtp.model_not_logged": f"{size / 1e9:.2f} GB > log_model_max_size {limit}"})
            return
        tracker.log_artifact(final, "model")

    # uploads ------------------------------------------------------------------------------------------------
    def upload_failed(self) -> bool:
        """Whether an upload of this rank failed (the trainer all-reduces it with its stop flag)."""
        return self.mirror is not None and self.mirror.failed()

    def raise_upload_failure(self) -> NoReturn:
        """Raise this rank's upload error, or say that another rank's upload failed."""
        if self.mirror is not None:
            self.mirror.raise_if_failed()
        raise StorageError("an upload on another rank failed (its log names it); the run stops")

    def finish_uploads(self) -> None:
        """Wait for every upload (on every rank); any rank's failure fails them all."""
        if self.mirror is None:
            return
        try:
            self.mirror.close()
        except StorageError:
            pass  # raised below once the ranks agree, so that every rank stops with an error
        failed = torch.tensor([1.0 if self.mirror.failed() else 0.0], device=self.info.device)
        if dist_utils.all_reduce_sum(failed, self.info).item() > 0:
            self.raise_upload_failure()

    def upload_records(self) -> None:
        """The run's records, last (after the tracker has ended: the store's run.json has the final status)."""
        if self.mirror is not None:
            self.mirror.upload_records()


# ------------------------------------------------------------------------------------------------ resume discovery
def find_resume(resume: str | None, run_dir: Path, info: DistInfo | None = None,
                run_url: str | None = None) -> Path | None:
    """`auto` → the run's latest complete checkpoint (None when there is none); a path → that checkpoint. Leftovers
    of a save that was killed mid-write are removed first. With a remote run (`run_url`) the latest complete
    checkpoint, local or remote, is used; a remote one is downloaded into `run_dir` by rank 0, and by another rank
    only when its node does not share rank 0's disk."""
    if resume is None:
        return None
    if info is None or not info.distributed:
        return _find_resume(resume, run_dir, run_url)
    found: tuple[str, str | None] = ("", None)  # (error, checkpoint name)
    if info.is_main:
        try:
            path = _find_resume(resume, run_dir, run_url)
            found = ("", str(path) if path else None)
        except ConfigError as exc:
            found = (str(exc), None)
    error, chosen = dist_utils.broadcast_object(found, info)
    if error:
        raise ConfigError(error)
    if chosen is None:
        return None
    path = Path(chosen)
    if not info.is_main and not (path / STATE_FILE).is_file() and run_url is not None:
        for _, url, marker in remote_checkpoints(run_url):
            if url.endswith("/" + path.name):
                download_checkpoint(url, marker, path)
    return path


def _find_resume(resume: str, run_dir: Path, run_url: str | None) -> Path | None:
    """The checkpoint to resume from, with the run's records it keeps copied back into `run_dir` where they are
    missing (a run directory lost with its machine)."""
    path = _checkpoint_to_resume(resume, run_dir, run_url)
    if path is not None:
        restore_records(path, run_dir)
    return path


def _checkpoint_to_resume(resume: str, run_dir: Path, run_url: str | None) -> Path | None:
    if resume == "auto":
        remove_partial_checkpoints(run_dir)
        found = list_checkpoints(run_dir)
        if run_url is not None:
            return latest_checkpoint(run_dir, run_url, found)
        return found[-1] if found else None
    if is_remote(resume):
        for _, url, marker in remote_checkpoints(run_url):
            if url.rstrip("/") == resume.rstrip("/"):
                return download_checkpoint(url, marker, run_dir / "checkpoints" / url.rsplit("/", 1)[-1])
        raise ConfigError(f"--resume {resume}: not a complete checkpoint (no {COMPLETE} marker)")
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"--resume {resume}: not a checkpoint directory (no {STATE_FILE})")
    return path
