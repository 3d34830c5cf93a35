"""Heads trained on a frozen trunk from its cached states: `wmtp cache-states` writes the config's `trunk_cache`
(`model.trunk_cache`: the format and the fingerprint) and set-up opens it for training and validation.

Refused, each with one line: a cache with `mtp.trainable: all` (the trunk trains, its states move), under FSDP2 (the
fingerprint hashes the whole base model, which no FSDP2 rank holds), a storage URL (the file is memory-mapped), and
a scheme that runs the trunk on its own (the critic, GRPO: their `build` says so).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..config import Config, ConfigError, Recipe
from ..model.mtp import MTPModel
from ..model.trunk_cache import TrunkStateCache, fingerprint_parts, plan_cache, write_states
from ..runtime.distributed import DistInfo, resolve_device
from ..runtime.precision import autocast_for
from ..runtime.storage import is_remote


def cache_sets(data) -> dict:
    """The sequences a cache holds, by split (`RunData`)."""
    return {"train": data.train_set, "validation": data.val_set}


def check_trunk_cache(config: Config, recipe: Recipe, distributed: str, world_size: int, path: str) -> None:
    """The checks that need neither data nor model."""
    if recipe.mtp.trainable != "heads":
        raise ConfigError(f"{config.where('trunk_cache')}: trunk_cache: the trunk's states are fixed only when it is "
                          f"frozen; set mtp.trainable: heads in {recipe.where('mtp.trainable')} (it is "
                          f"{recipe.mtp.trainable})")
    if world_size > 1 and distributed == "fsdp2":
        raise ConfigError(f"{config.where('trunk_cache')}: trunk_cache is not supported under compute.distributed: "
                          "fsdp2 (its fingerprint hashes the whole base model); use ddp")
    if is_remote(path):
        raise ConfigError(f"{config.where('trunk_cache')}: trunk_cache must be a local file (it is memory-mapped), "
                          f"got {path}")


def open_trunk_cache(config: Config, recipe: Recipe, info: DistInfo, model: MTPModel, data) -> TrunkStateCache | None:
    """The run's cache, checked against its data, tokenizer, base weights, head type, dtype and precision; None
    when the config names none."""
    if config.trunk_cache is None:
        return None
    check_trunk_cache(config, recipe, config.compute.distributed, info.world_size, config.trunk_cache)
    sets = cache_sets(data)
    dtype = next(model.base.parameters()).dtype
    expected = fingerprint_parts(model, sets, data.tokenizer, dtype, config.compute.precision)
    return TrunkStateCache(Path(config.trunk_cache), expected, plan_cache(model, sets, dtype))


def cache_target(config: Config, recipe: Recipe, out: Path | None) -> Path:
    """Where `wmtp cache-states` writes: `out`, else the config's `trunk_cache`; checked like a run's cache."""
    if out is None and config.trunk_cache is None:
        raise ConfigError(f"{config.source}: trunk_cache: give the cache file (config key trunk_cache or --out)")
    target = out if out is not None else Path(config.trunk_cache)
    check_trunk_cache(config, recipe, "ddp", 1, str(target))
    return target


def cache_states(config: Config, recipe: Recipe, data, model: MTPModel, out: Path | None) -> Path:
    """Run the frozen trunk once over the run's training and validation sequences and write the cache to `out`
    (default: the config's `trunk_cache`)."""
    target = cache_target(config, recipe, out)
    device = resolve_device(config.compute.device)
    model = model.to(device)
    sets = cache_sets(data)
    dtype = next(model.base.parameters()).dtype
    started = time.monotonic()
    fingerprint = fingerprint_parts(model, sets, data.tokenizer, dtype, config.compute.precision)
    plan = write_states(target, model, sets, fingerprint, batch_size=recipe.train.micro_batch_size, device=device,
                        autocast=autocast_for(device, config.compute.precision))
    tokens = sum(n * s for name, (n, s, _) in plan.shapes.items() if name.endswith(".final"))
    print(f"cached the trunk's states of {tokens} token positions in {time.monotonic() - started:.1f}s -> {target}")
    return target


def model_for_cache(config: Config, recipe: Recipe, tokenizer) -> MTPModel:
    """The model as training builds it (same seed), on the CPU; its base is what the cache is computed with."""
    from ..model.build import build_model

    torch.manual_seed(config.compute.seed)
    return build_model(config.model, recipe.mtp, tokenizer)
