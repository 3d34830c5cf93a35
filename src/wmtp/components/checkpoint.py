"""Training checkpoints: sharded, written by every rank at once, complete or absent, and loadable at another world
size.

A checkpoint is a directory `checkpoints/step-00000100/` holding
- `state/`: the model and the optimizer in `torch.distributed.checkpoint` form: each rank writes its own shards
  (a replicated tensor once), the coordinator writes `.metadata` after every rank's data;
- `rng-rank<r>.json`: the RNG state of rank r;
- `mtp.json` and `config.json`: the MTP shape and the base model's config (to rebuild the model around the state);
- `tokenizer/`, and `scheme.safetensors` when the weighting scheme has trainable state (the critic's value head);
- `records/`: the run's run.json, metrics.jsonl, config.yaml and recipe.yaml as they were at this step (a resume
  continues them: tracking.py);
- `trainer_state.json`, written last: step, data position, scheduler, early-stopping and scheme state, the MLflow
  run id. The directory is filled under a hidden name and renamed only after that, so a save killed at any point
  leaves no `step-*` directory; its leftovers are removed on the next save or resume.

A small checkpoint (`save_small_checkpoint`: critic stage 1, whose trunk is frozen) holds a scheme's modules
without model shards: `state.safetensors` and `state.json`, the directory replaced whole. Its files are named apart
from a training checkpoint's so that no `--resume` or `wmtp eval --checkpoint` takes one for the other. A small
module's optimizer goes into either as flat tensors plus JSON param groups (`optimizer_tensors`): no pickles in
checkpoints.

Loading reshards: a checkpoint saved by 2 ranks (DDP or FSDP2) resumes on 1 and the other way round, because each
tensor is stored once under its name with its global shape. A damaged file is an error naming it.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..config import ConfigError
from ..model.mtp import MTPConfig, MTPModel, read_tensors
from ..runtime.atomic import atomic_directory
from ..runtime.distributed import DistInfo, mps_available

STATE_FILE = "trainer_state.json"
SHARDS_DIR = "state"
SCHEME_FILE = "scheme.safetensors"
MTP_FILE = "mtp.json"
TOKENIZER_DIR = "tokenizer"
SMALL_TENSORS_FILE = "state.safetensors"  # a small checkpoint's tensors
SMALL_STATE_FILE = "state.json"  # a small checkpoint's state, written last


def remove_partial_checkpoints(run_dir: Path) -> None:
    """Remove what a save killed mid-write left behind: the hidden directories a save fills before its rename
    (`checkpoints/.step-*`, `.final.*`). A complete checkpoint is never hidden."""
    for pattern in ("checkpoints/.step-*", ".final.*"):
        for leftover in run_dir.glob(pattern):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoint_step(path: Path | str) -> int:
    """The optimizer step of a checkpoint directory `.../step-<N>`."""
    return int(Path(path).name.removeprefix("step-"))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
                  and (p / STATE_FILE).is_file())


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    if mps_available():
        state["mps"] = torch.mps.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    if "mps" in state and mps_available():
        torch.mps.set_rng_state(torch.tensor(state["mps"], dtype=torch.uint8))


@contextmanager
def _one_process_is_intended() -> Iterator[None]:
    """DCP warns that it 'assumes the intent' of a single process when no process group exists; here it is."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def save_model(model: MTPModel, directory: Path, tokenizer, info: DistInfo, max_shard_size: int) -> Path | None:
    """The final model as a Hugging Face directory: every rank takes part in the tensor-by-tensor gathers, rank 0
    writes (see `MTPModel.save_pretrained`)."""
    return model.save_pretrained(directory, tokenizer=tokenizer, max_shard_size=max_shard_size, write=info.is_main)


def save_checkpoint(run_dir: Path, step: int, model: MTPModel, optimizer: torch.optim.Optimizer, scheduler,
                    trainer_state: dict, tokenizer, info: DistInfo, keep_last: int,
                    scheme_tensors: dict[str, torch.Tensor] | None = None, prune: bool = True,
                    extra_files: dict[str, Path] | None = None) -> Path:
    """Every rank writes its shards and RNG state in parallel; rank 0 then writes the rest, `trainer_state.json`
    last, renames the directory into place and (with `prune`) removes old checkpoints. Returns the checkpoint's
    path. On a node whose disk rank 0 does not share, the other ranks rename their own part into place.
    `extra_files` (name in the checkpoint -> file) are copied in by rank 0: the run's records as of this step."""
    root = run_dir / "checkpoints"
    target = root / checkpoint_name(step)
    partial = root / f".{target.name}.partial"
    if info.is_main:
        remove_partial_checkpoints(run_dir)
        partial.mkdir(parents=True)
    _barrier(info)
    partial.mkdir(parents=True, exist_ok=True)  # a node that does not share rank 0's disk
    state = {"model": get_model_state_dict(model)}
    # Before the first step there is no optimizer state, and get_optimizer_state_dict would create it with a
    # zero-lr step (advancing Adam's step count): such a checkpoint holds the model alone.
    has_optimizer_state = bool(optimizer.state)
    if has_optimizer_state:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    with _one_process_is_intended():
        dcp.save(state, checkpoint_id=partial / SHARDS_DIR, no_dist=not info.distributed)
    (partial / f"rng-rank{info.rank}.json").write_text(json.dumps(rng_state()))
    _barrier(info)
    if info.is_main:
        (partial / MTP_FILE).write_text(json.dumps({"n_heads": model.n_heads, "head_type": model.mtp_config.head_type}))
        model.config.to_json_file(partial / "config.json")
        tokenizer.save_pretrained(partial / TOKENIZER_DIR)
        if scheme_tensors:  # a weighting scheme's own trainable state (the critic's value head)
            save_file(scheme_tensors, partial / SCHEME_FILE)
        for name, source in (extra_files or {}).items():
            (partial / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, partial / name)
        full = {**trainer_state, "step": step, "scheduler": scheduler.state_dict(),
                "optimizer_param_groups": optimizer.state_dict()["param_groups"],
                "has_optimizer_state": has_optimizer_state, "world_size": info.world_size}
        (partial / STATE_FILE).write_text(json.dumps(full, indent=1))
        if target.exists():
            shutil.rmtree(target)
        partial.rename(target)
        for old in list_checkpoints(run_dir)[:-keep_last] if prune else ():
            shutil.rmtree(old)
    _barrier(info)
    if not info.is_main and partial.is_dir() and not target.exists():
        partial.rename(target)
    return target


def read_trainer_state(path: Path, name: str = STATE_FILE) -> dict:
    """The JSON state `name` of checkpoint `path`; a missing or damaged file is an error naming it."""
    state_path = path / name
    if not state_path.is_file():
        raise ConfigError(f"{path}: not a checkpoint (no {name})")
    try:
        return json.loads(state_path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{state_path}: not valid JSON ({exc}); the checkpoint is damaged or was cut short, "
                          "resume from an earlier one") from None


def _load_shards(state: dict, path: Path, distributed: bool) -> None:
    try:
        with _one_process_is_intended():
            dcp.load(state, checkpoint_id=path / SHARDS_DIR, no_dist=not distributed)
    except (Exception, CheckpointException) as exc:  # DCP's own error is a BaseException; name the directory
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{path / SHARDS_DIR}: cannot read the checkpoint's shards ({first}); the checkpoint is "
                          "damaged or incomplete") from None


def load_checkpoint(path: Path, model: MTPModel, optimizer: torch.optim.Optimizer, scheduler,
                    info: DistInfo) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG from `path` (saved at any world size); returns the
    trainer state, with the scheme's tensors under `scheme_tensors`."""
    state = read_trainer_state(path)
    saved = json.loads((path / MTP_FILE).read_text())
    if MTPConfig(**saved) != model.mtp_config:
        raise ConfigError(f"{path}: checkpoint has {MTPConfig(**saved)}, the recipe asks for {model.mtp_config}")
    shards = {"model": get_model_state_dict(model)}
    # A checkpoint from before the first step has no optimizer state. Loading one anyway would let
    # torch.distributed.checkpoint materialise the state with a zero-lr step, which advances Adam's step count
    # and changes its bias correction: keep the fresh optimizer instead.
    if state["has_optimizer_state"]:
        shards["optimizer"] = get_optimizer_state_dict(model, optimizer)
    _load_shards(shards, path, info.distributed)
    set_model_state_dict(model, shards["model"])
    if state["has_optimizer_state"]:
        set_optimizer_state_dict(model, optimizer, shards["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    own = path / f"rng-rank{info.rank}.json"  # a rank the saving run did not have continues rank 0's stream
    set_rng_state(json.loads((own if own.is_file() else path / "rng-rank0.json").read_text()))
    state["scheme_tensors"] = read_tensors(path / SCHEME_FILE) if (path / SCHEME_FILE).is_file() else {}
    return state


def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], list]:
    """A small module's optimizer state as flat tensors `<prefix>/<param index>/<name>` plus its JSON-able param
    groups (a scheme's own optimizer: the critic's value head)."""
    state = optimizer.state_dict()
    tensors = {f"{prefix}/{i}/{k}": torch.as_tensor(v).detach().cpu().contiguous()
               for i, per in state["state"].items() for k, v in per.items()}
    return tensors, state["param_groups"]


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list,
                           prefix: str) -> None:
    """Restore what `optimizer_tensors` wrote (other keys of `tensors` are ignored)."""
    per: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "/"):
            _, index, name = key.split("/")
            per.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per, "param_groups": groups})


def save_small_checkpoint(directory: Path, tensors: dict[str, torch.Tensor], state: dict) -> None:
    """A checkpoint of modules small enough for one process to write (rank 0): `tensors` in `state.safetensors`,
    `state` in `state.json`; the directory is replaced whole or not at all."""
    with atomic_directory(directory) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / SMALL_TENSORS_FILE)
        (tmp / SMALL_STATE_FILE).write_text(json.dumps(state))


def load_small_checkpoint(directory: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, state) of `save_small_checkpoint`; a damaged file is an error naming it."""
    state = read_trainer_state(directory, SMALL_STATE_FILE)
    return read_tensors(directory / SMALL_TENSORS_FILE), state


def load_checkpoint_model(path: Path, dtype: torch.dtype | None = None) -> MTPModel:
    """The model of a training checkpoint on its own, in one process (for evaluation): built from the saved
    configs, its weights read from the shards."""
    from transformers import AutoConfig, AutoModelForCausalLM

    read_trainer_state(path)
    base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), **({"dtype": dtype} if dtype else {}))
    mtp = json.loads((path / MTP_FILE).read_text())
    model = MTPModel.from_base(base, n_heads=mtp["n_heads"], head_type=mtp["head_type"])
    shards = {"model": get_model_state_dict(model)}
    _load_shards(shards, path, distributed=False)
    set_model_state_dict(model, shards["model"])
    return model.eval()
