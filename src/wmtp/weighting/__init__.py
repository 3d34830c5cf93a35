"""Weighting schemes: one file per scheme, each turning an optimizer step's micro-batches into detached importance
weights [B, S, n] (docs/method.md §5).

`SCHEMES` is the one table from a recipe's `algorithm` to the module that owns the scheme; nothing outside this
package branches on the name. The trainer calls `scheme.step_weights(batches)` once per optimizer step with
every micro-batch of the step, so a scheme can rank or standardise over the whole step (and all ranks) before any
backward pass. How to add a scheme: docs/architecture.md.
"""

from __future__ import annotations

import importlib

from pydantic import BaseModel, ValidationError

from ..config import LEGACY_ALGORITHMS, ConfigError, Recipe, describe_error

# algorithm name (recipe `algorithm`) -> module of this package that defines `PLUGIN`
SCHEMES: dict[str, str] = {
    "baseline-mtp": "uniform",
    "rho1": "rho1",
    "critic": "critic",
    "gradnorm": "gradnorm",
    "hybrid": "hybrid",
    "grpo": "grpo",
}


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


__all__ = ["SCHEMES", "plugin", "scheme_settings"]
