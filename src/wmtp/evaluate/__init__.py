"""Evaluation: pass@k over sandboxed execution, head quality on held-out text, self-speculative decoding, reports."""

from .passk import bootstrap_ci, pass_at_k

__all__ = ["bootstrap_ci", "pass_at_k"]
