"""The Rho-1 weighting scheme: see `scheme`. `PLUGIN` is imported on first use (PEP 562), so the torch-free
declarations beside it (`settings`: the config keys Rho-1 owns, `command`: `wmtp score-reference`) load light."""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "PLUGIN":
        from .scheme import PLUGIN

        return PLUGIN
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PLUGIN"]
