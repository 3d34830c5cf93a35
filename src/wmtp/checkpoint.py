"""Training checkpoints: everything a run needs to continue bit for bit, written atomically.

A checkpoint is a directory `step-00000100/` holding
- `model/`: the model as `MTPModel.save_pretrained` writes it (safetensors, config, tokenizer);
- `optimizer.safetensors`: every optimizer state tensor, keyed `<parameter name>/<state name>`;
- `trainer_state.json`: step, data position, scheduler, optimizer hyper-parameters, early-stopping state,
  the MLflow run id, and the RNG states (as lists of bytes).
Full (unsharded) state dicts are gathered from every rank and written by rank 0, so a checkpoint written
under FSDP2 or DDP loads on one process and the other way round. A damaged file is an error naming it; what a
save killed mid-write leaves behind is removed on the next save or resume.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .atomic import atomic_directory
from .config import ConfigError
from .distributed import DistInfo
from .model import MTPModel, read_tensors

STATE_FILE = "trainer_state.json"
SCHEME_FILE = "scheme.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def remove_partial_checkpoints(run_dir: Path) -> None:
    """Remove what a save killed mid-write left behind: the hidden temporary directories `atomic_directory`
    fills before the rename (`checkpoints/.step-*`, `.final.*`). A complete checkpoint is never hidden."""
    for pattern in ("checkpoints/.step-*", ".final.*"):
        for leftover in run_dir.glob(pattern):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
                  and (p / STATE_FILE).is_file())


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def save_model(model: MTPModel, directory: Path, tokenizer, info: DistInfo) -> Path | None:
    """Gather the full model on every rank (a no-op copy when not sharded) and write it from rank 0."""
    state = get_model_state_dict(model, options=_FULL)
    return model.save_pretrained(directory, tokenizer=tokenizer, state_dict=state) if info.is_main else None


def save_checkpoint(run_dir: Path, step: int, model: MTPModel, optimizer: torch.optim.Optimizer, scheduler,
                    trainer_state: dict, tokenizer, info: DistInfo, keep_last: int,
                    scheme_tensors: dict[str, torch.Tensor] | None = None) -> Path | None:
    """Gather on every rank, write on rank 0 (into a temp dir, renamed when complete), prune old ones."""
    model_state = get_model_state_dict(model, options=_FULL)
    # Before the first step there is no optimizer state, and get_optimizer_state_dict would create it with a
    # zero-lr step (advancing Adam's step count): save the empty state as it is, on every rank alike.
    optim_state = (get_optimizer_state_dict(model, optimizer, options=_FULL) if optimizer.state else
                   {"state": {}, "param_groups": optimizer.state_dict()["param_groups"]})
    if not info.is_main:
        return None
    remove_partial_checkpoints(run_dir)
    root = run_dir / "checkpoints"
    target = root / checkpoint_name(step)
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp / "model", tokenizer=tokenizer, state_dict=model_state)
        tensors = {}
        for name, per_param in optim_state["state"].items():
            for key, value in per_param.items():
                tensors[f"{name}/{key}"] = torch.as_tensor(value).detach().contiguous().cpu()
        save_file(tensors, tmp / OPTIMIZER_FILE)
        if scheme_tensors:  # a weighting scheme's own trainable state (the critic's value head)
            save_file(scheme_tensors, tmp / SCHEME_FILE)
        state = {**trainer_state, "step": step, "scheduler": scheduler.state_dict(),
                 "optimizer_param_groups": optim_state["param_groups"], "rng": rng_state()}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old)
    return target


def load_checkpoint(path: Path, model: MTPModel, optimizer: torch.optim.Optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and RNG from `path` on every rank; returns the trainer state."""
    state_path = path / STATE_FILE
    if not state_path.is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint (no {STATE_FILE})")
    try:
        state = json.loads(state_path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{state_path}: not valid JSON ({exc}); the checkpoint is damaged or was cut short, "
                         "resume from an earlier one") from None
    saved = MTPModel.from_pretrained(path / "model")
    if saved.mtp_config != model.mtp_config:
        raise ValueError(f"{path}: checkpoint has {saved.mtp_config}, the recipe asks for {model.mtp_config}")
    set_model_state_dict(model, saved.state_dict(), options=StateDictOptions(full_state_dict=True))
    del saved
    tensors = read_tensors(path / OPTIMIZER_FILE)
    per_param: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, field = key.rpartition("/")
        per_param.setdefault(name, {})[field] = value
    # A checkpoint from before the first step has no optimizer state. Loading one anyway would let
    # torch.distributed.checkpoint materialise the state with a zero-lr step, which advances Adam's step count
    # and changes its bias correction: keep the fresh optimizer instead.
    if per_param:
        set_optimizer_state_dict(model, optimizer, {"state": per_param,
                                                    "param_groups": state["optimizer_param_groups"]},
                                 options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    state["scheme_tensors"] = read_tensors(path / SCHEME_FILE) if (path / SCHEME_FILE).is_file() else {}
    return state
