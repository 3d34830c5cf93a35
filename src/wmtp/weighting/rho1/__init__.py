"""The Rho-1 weighting scheme: see `scheme`."""

from .scheme import PLUGIN

__all__ = ["PLUGIN"]
