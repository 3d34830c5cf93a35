"""Weighting schemes: one file per scheme, each a small object that turns an optimizer step's micro-batches
into detached importance weights [B, S, n] (REFERENCE.md §4).

The trainer calls `scheme.step_weights(batches)` once per optimizer step with every micro-batch of the
step, so a scheme can rank or standardise over the whole step (and all-reduce over ranks) before any
backward pass. Returning None for a micro-batch means uniform weights.
"""

from .base import StepBatch, WeightingScheme
from .rho1 import Rho1Weighting
from .uniform import UniformWeighting

__all__ = ["Rho1Weighting", "StepBatch", "UniformWeighting", "WeightingScheme"]
