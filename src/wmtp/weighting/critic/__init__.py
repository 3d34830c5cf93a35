"""The Critic-WMTP weighting scheme: see `scheme`."""

from .scheme import PLUGIN

__all__ = ["PLUGIN"]
