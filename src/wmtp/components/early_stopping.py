"""Early stopping on a validation metric (recipe `train.early_stopping`); its state goes into checkpoints."""

from __future__ import annotations

from ..config import EarlyStopping


class EarlyStopper:
    """Recipe `train.early_stopping`: stop after `patience` evaluations without an improvement of `metric` by
    more than `min_delta` (in the rule's direction). Its state goes into checkpoints."""

    def __init__(self, rule: EarlyStopping | None) -> None:
        self.rule = rule
        self.best: float | None = None
        self.bad_evals = 0

    def should_stop(self, metrics: dict[str, float]) -> bool:
        rule = self.rule
        if rule is None or rule.metric not in metrics:  # not measured at this evaluation: neither better nor worse
            return False
        value = metrics[rule.metric]
        improved = (self.best is None or (value < self.best - rule.min_delta if rule.mode == "min"
                                          else value > self.best + rule.min_delta))
        if improved:
            self.best, self.bad_evals = value, 0
        else:
            self.bad_evals += 1
        return self.bad_evals >= rule.patience

    def reason(self) -> str:
        return f"early stopping: {self.rule.metric} did not improve for {self.rule.patience} evaluations"
