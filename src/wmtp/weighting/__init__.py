"""Weighting schemes: one file per scheme, each turning an optimizer step's micro-batches into detached importance
weights [B, S, n] (docs/method.md §5).

`SCHEMES` is the one table from a recipe's `algorithm` to the module that owns the scheme; nothing outside this
package branches on the name. The trainer calls `scheme.step_weights(batches)` once per optimizer step with
every micro-batch of the step, so a scheme can rank or standardise over the whole step (and all ranks) before any
backward pass. How to add a scheme: docs/architecture.md.

A scheme may also own top-level config keys (`CONFIG_SECTIONS`) and `wmtp` commands (`COMMANDS`). Both are
declared in torch-free modules, so `wmtp --help` and config errors answer without importing torch; the general
config keeps these keys as given and `checked_config` validates them with their scheme's schema.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from ..config import LEGACY_ALGORITHMS, Config, ConfigError, Recipe, Strict, describe_error, override_for

# algorithm name (recipe `algorithm`) -> module of this package that defines `PLUGIN`
SCHEMES: dict[str, str] = {
    "baseline-mtp": "uniform",
    "rho1": "rho1",
    "critic": "critic",
    "gradnorm": "gradnorm",
    "hybrid": "hybrid",
    "grpo": "grpo",
    "dpace": "dpace",
}

# scheme -> torch-free module of this package whose `CONFIG` (a `SchemeConfig`) declares the config keys it owns
CONFIG_SECTIONS: dict[str, str] = {"rho1": "rho1.settings"}

# `wmtp` command -> torch-free module of this package whose `COMMAND` (a `SchemeCommand`) declares it
COMMANDS: dict[str, str] = {"score-reference": "rho1.command"}


class SchemeConfig(Strict):
    """The top-level config keys a scheme owns (its fields). A config may serve several recipes, so every scheme's
    keys are accepted with any algorithm; an unknown key is an error."""

    def frozen_model(self) -> Any | None:
        """A model source the scheme runs frozen beside the trained model in every step (the memory plan counts
        it), or None."""
        return None


@dataclass(frozen=True)
class CommandInputs:
    """What a scheme's command gets: the validated config and recipe (`--set` applied), and `load_data()`, which
    reads the run's data as training does (`.tokenizer`, `.train_set`, ...; called after the cheap checks)."""

    config: Config
    recipe: Recipe
    load_data: Callable[[], Any]


@dataclass(frozen=True)
class SchemeCommand:
    """`wmtp <name> --config C --recipe R [--set KEY=VALUE] [--verbose]`, added by a scheme: `run` returns the
    exit code and imports what it needs when it runs."""

    name: str
    help: str
    run: Callable[[CommandInputs], int]


def _declaration(module: str) -> Any:
    return importlib.import_module(f"{__name__}.{module}")


def config_schemas() -> dict[str, type[SchemeConfig]]:
    """scheme -> the schema of the config keys it owns."""
    return {scheme: _declaration(module).CONFIG for scheme, module in CONFIG_SECTIONS.items()}


def config_section_names() -> set[str]:
    """Every top-level config key a scheme owns (`--set` sends these to the config)."""
    return {name for schema in config_schemas().values() for name in schema.model_fields}


def scheme_config(config: Config, scheme: str) -> SchemeConfig:
    """The config keys `scheme` owns, validated by its schema (defaults for those the config leaves out)."""
    schema = config_schemas()[scheme]
    try:
        return schema.model_validate({k: v for k, v in config.sections.items() if k in schema.model_fields})
    except ValidationError as exc:
        raise ConfigError(describe_error(exc, config.source, config.overrides)) from None


def checked_config(config: Config) -> Config:
    """The config with every scheme-owned key validated by its scheme's schema, defaults included (so they are
    logged as parameters, and secrets are `SecretStr`: masked, left out of the run's config.yaml); a key no scheme
    owns is an error naming the file (or the `--set` override)."""
    owned = config_section_names()
    for name in config.sections:
        if name not in owned:
            raise ConfigError(f"{override_for(name, config.overrides) or config.source}: {name}: unknown key")
    validated = {name: getattr(scheme_config(config, scheme), name)
                 for scheme, schema in config_schemas().items() for name in schema.model_fields}
    return config.with_sections(validated)


def frozen_model(config: Config) -> Any | None:
    """The model source a scheme runs frozen beside the trained one (Rho-1's online reference), or None."""
    found = (scheme_config(config, scheme).frozen_model() for scheme in CONFIG_SECTIONS)
    return next((model for model in found if model is not None), None)


def commands() -> dict[str, SchemeCommand]:
    """The commands the schemes add to `wmtp`, by name (their modules are light: no torch)."""
    return {name: _declaration(module).COMMAND for name, module in COMMANDS.items()}


def plugin(algorithm: str, where: str = "recipe"):
    """The `SchemePlugin` of an algorithm name (its module is imported on demand)."""
    if algorithm in LEGACY_ALGORITHMS:
        raise ConfigError(f"{where}: algorithm: `{algorithm}` is the earlier project's name; it is now "
                          f"`{LEGACY_ALGORITHMS[algorithm]}`")
    if algorithm not in SCHEMES:
        raise ConfigError(f"{where}: algorithm: unknown `{algorithm}` (choose from {', '.join(sorted(SCHEMES))})")
    return importlib.import_module(f"{__name__}.{SCHEMES[algorithm]}").PLUGIN


def scheme_settings(recipe: Recipe) -> BaseModel:
    """The recipe's scheme sections validated by the scheme's own settings model; a section that belongs to
    another scheme, or to none, is an error naming the recipe file and the key."""
    chosen = plugin(recipe.algorithm, recipe.where("algorithm"))
    sections = recipe.sections
    for name in sections:
        where = recipe.where(name)
        if name not in chosen.settings.model_fields:
            # the schemes that own the section, those that need it first (a hybrid accepts every scheme's
            # sections and needs none of them)
            owners = sorted((a for a in SCHEMES if name in plugin(a).settings.model_fields),
                            key=lambda a: (not plugin(a).settings.model_fields[name].is_required(), a))
            if owners:
                raise ConfigError(f"{where}: {name}: the `{name}` section goes with algorithm: {owners[0]}, not "
                                  f"{recipe.algorithm}")
            raise ConfigError(f"{where}: {name}: unknown key")
    try:
        return chosen.settings.model_validate(sections)
    except ValidationError as exc:
        raise ConfigError(describe_error(exc, recipe.source, recipe.overrides)) from None


__all__ = ["COMMANDS", "CONFIG_SECTIONS", "SCHEMES", "CommandInputs", "SchemeCommand", "SchemeConfig",
           "checked_config", "commands", "config_schemas", "config_section_names", "frozen_model", "plugin",
           "scheme_config", "scheme_settings"]
