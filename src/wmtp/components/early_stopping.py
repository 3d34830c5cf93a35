"""Early stopping on a validation metric (recipe `train.early_stopping`, and critic stage 1's held-out value loss);
its state goes into checkpoints."""

from __future__ import annotations

from ..config import EarlyStopping


class EarlyStopper:
    """Stop after `patience` evaluations without an improvement of `metric` by more than `min_delta` (in the
    rule's direction). Its state (`best`, `bad_evals`) goes into checkpoints."""

    def __init__(self, rule: EarlyStopping | None) -> None:
        self.rule = rule
        self.best: float | None = None
        self.bad_evals = 0

    def observe(self, metrics: dict[str, float]) -> bool | None:
        """Record one evaluation: whether it improved on the best so far; None when it did not measure the metric
        (neither better nor worse) or there is no rule."""
        rule = self.rule
        if rule is None or rule.metric not in metrics:
            return None
        value = metrics[rule.metric]
        improved = (self.best is None or (value < self.best - rule.min_delta if rule.mode == "min"
                                          else value > self.best + rule.min_delta))
        if improved:
            self.best, self.bad_evals = value, 0
        else:
            self.bad_evals += 1
        return improved

    def exhausted(self) -> bool:
        """Whether `patience` evaluations in a row did not improve."""
        return self.rule is not None and self.bad_evals >= self.rule.patience

    def should_stop(self, metrics: dict[str, float]) -> bool:
        return self.observe(metrics) is not None and self.exhausted()

    def reason(self) -> str:
        return f"early stopping: {self.rule.metric} did not improve for {self.rule.patience} evaluations"

    def state(self) -> dict:
        return {"best": self.best, "bad_evals": self.bad_evals}

    def load_state(self, state: dict) -> None:
        self.best, self.bad_evals = state["best"], state["bad_evals"]
