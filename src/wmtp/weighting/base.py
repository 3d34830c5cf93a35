"""What every weighting scheme follows: the settings it owns, how it is built, and the calls the trainer makes.

A scheme module (one file in this package) defines
- a settings model: a `Strict` pydantic model whose fields are the recipe sections the scheme owns (Rho-1:
  `rho1`; the critic: `critic` and `pretrain`), validated where it is defined;
- `build(settings, context) -> WeightingScheme`, called once in set-up with a `SchemeContext`; every check of
  the scheme's settings against the run (files, devices, data) happens there, so `--dry-run` catches it;
- `PLUGIN = SchemePlugin(settings=..., build=...)`, which the table `wmtp.weighting.SCHEMES` names.
The trainer never sees the scheme's name or settings; it calls the protocol methods of `WeightingScheme`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel

from ..config import ConfigError
from ..runtime.distributed import DistInfo
from ..runtime.tracking import Histogram

if TYPE_CHECKING:
    from ..config import Config, Recipe
    from ..data.sequences import SequenceSet
    from ..data.sources import Example
    from ..data.steps import StepPlan
    from ..model.mtp import MTPModel, TrunkStates
    from ..model.trunk_cache import TrunkStateCache


@dataclass
class StepBatch:
    """One micro-batch of an optimizer step. input_ids, attention_mask, document_ids: [B, S]; labels: [B, S, n];
    rows: [B], the sequences' indices in the training set (for per-sequence caches)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    rows: torch.Tensor
    document_ids: torch.Tensor | None = None


@dataclass(frozen=True)
class SchemeContext:
    """What a scheme may use to build itself: never the trainer.

    model: the unwrapped MTP model; wrapped: the form the trainer steps (DDP/FSDP2, or the model itself);
    autocast: the forward's autocast context (re-entrant); plan: how the data is cut into steps;
    train_examples / val_examples: the documents behind the sequence sets (for rewards);
    config: the run's config (model and reference sources, caches, compute); recipe: the run's recipe (the loss
    reduction, the data's sequence length); trunk_cache: the frozen trunk's cached states (config `trunk_cache`),
    or None: a scheme's own pass of the stepped model passes `trunk_states(batch)` to its forward."""

    model: MTPModel
    wrapped: torch.nn.Module
    autocast: AbstractContextManager
    info: DistInfo
    plan: StepPlan
    train_set: SequenceSet
    val_set: SequenceSet | None
    train_examples: list[Example]
    val_examples: list[Example]
    tokenizer: Any
    config: Config
    recipe: Recipe
    trunk_cache: TrunkStateCache | None = None

    def trunk_states(self, batch: StepBatch) -> TrunkStates | None:
        """The cached trunk states of a training micro-batch (None without a cache: the forward runs the trunk)."""
        return None if self.trunk_cache is None else self.trunk_cache.states("train", batch.rows, self.info.device)

    def refuse_trunk_cache(self, algorithm: str, why: str) -> None:
        """For a scheme that runs the trunk itself: a run with a trunk cache is an error saying why."""
        if self.trunk_cache is not None:
            raise ConfigError(f"{self.config.where('trunk_cache')}: trunk_cache: algorithm {algorithm} {why}; "
                              "remove trunk_cache to train through the trunk")


@dataclass(frozen=True)
class RunHooks:
    """What the training run offers a scheme's own stage before the first step (the critic's stage 1): where the
    run writes, how to log metrics, and whether a signal asked the run to stop (all-reduced over ranks)."""

    run_dir: Path
    log_metrics: Callable[[dict[str, float], int], None]
    stop_requested: Callable[[], bool]


class WeightingScheme:
    """Base class: `step_weights` returns one detached [B, S, n] tensor (or None = uniform) per micro-batch."""

    allow_negative = False  # a scheme that produces negative weights must say so (docs/method.md §3)

    def step_batches(self, step: int, batches: list[StepBatch]) -> list[StepBatch]:
        """What optimizer step `step` trains on, given this rank's micro-batches of the data: by default those
        micro-batches; a scheme that trains on its own samples (GRPO's rollouts) returns as many of its own."""
        return batches

    def step_weights(self, batches: list[StepBatch]) -> list[torch.Tensor | None]:
        raise NotImplementedError

    def metrics(self) -> dict[str, float]:
        """Scheme-specific metrics of the last step (selected fraction, excess-loss statistics, ...)."""
        return {}

    def artifacts(self) -> dict[str, str]:
        """Files (name -> text) the trainer writes to the run directory and logs at the end of the run."""
        return {}

    def histograms(self) -> dict[str, Histogram]:
        """Histograms of the last step by tag (the per-head weights: `rho1/weights_head0`), logged with its metrics
        (to TensorBoard)."""
        return {}

    # Hooks for schemes with trainable parts of their own (the critic's value head); no-ops here.
    def before_training(self, run: RunHooks) -> None:
        """Called once before the first step (after a resume too): e.g. a pre-training stage."""

    def auxiliary_loss(self, index: int, batch: StepBatch, out) -> torch.Tensor | None:
        """An extra loss for micro-batch `index` of the step, added to the weighted MTP loss before backward."""
        return None

    def weights_in_forward(self, index: int, batch: StepBatch) -> Callable | None:
        """For a scheme that weighs inside the training forward (one trunk forward per micro-batch): a function
        from the forward's detached head hidden states and the model to the micro-batch's weights [B, S, n]
        (`MTPLoss.weights_fn`); its `step_weights` then returns None for every micro-batch, and the
        run's reduction must be token_mean (whose normaliser does not depend on the weights). None: weights come
        from `step_weights` alone."""
        return None

    def after_backward(self, grad_clip: float | None) -> None:
        """Called after the model's optimizer step: step the scheme's own optimizer."""

    def evaluate(self) -> dict[str, float]:
        """Scheme-specific validation metrics (val/...) on the run's validation set."""
        return {}

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors and JSON-able state saved with every checkpoint."""
        return {}, {}

    def load_state(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        """Restore what `state` returned."""

    def finish(self, directory: Path) -> None:
        """Write the scheme's own files next to the final model."""


@dataclass(frozen=True)
class SchemePlugin:
    """A scheme as the table `wmtp.weighting.SCHEMES` finds it: the recipe sections it owns (the fields of
    `settings`) and its constructor."""

    settings: type[BaseModel]
    build: Callable[[Any, SchemeContext], WeightingScheme]


class PairSignalWeighting(WeightingScheme):
    """A scheme whose weights are a function of one per-pair signal [B, S, n] (Rho-1's excess loss, gradnorm's
    gradient norm at the logits), made either in a pass before the step over all its micro-batches (`scoring:
    separate_pass`) or inside each micro-batch's training forward from its own head hidden states (`scoring:
    in_forward`, statistics per micro-batch: docs/method.md §5). A subclass gives `scoring`, `record` (its
    `per_head.PerHeadRecord`, which its metrics, artifacts and histograms come from), `signal`,
    `signal_in_forward` and `weigh`."""

    scoring: str
    record: Any

    def signal(self, batch: StepBatch) -> torch.Tensor:
        """The signal of one micro-batch from a pass of its own: [B, S, n]."""
        raise NotImplementedError

    def signal_in_forward(self, hidden: list[torch.Tensor], model, batch: StepBatch) -> torch.Tensor:
        """The signal of one micro-batch from the training forward's detached head hidden states: [B, S, n]."""
        raise NotImplementedError

    def weigh(self, signals: list[torch.Tensor], labels: list[torch.Tensor]) -> list[torch.Tensor]:
        """Weights [B, S, n] per micro-batch from their signals, with statistics over all of them."""
        raise NotImplementedError

    def step_weights(self, batches: list[StepBatch]) -> list[torch.Tensor | None]:
        if self.scoring == "in_forward":
            self.record.new_step()
            return [None for _ in batches]
        return self.weigh([self.signal(b) for b in batches], [b.labels for b in batches])

    def weights_in_forward(self, index: int, batch: StepBatch) -> Callable | None:
        if self.scoring != "in_forward":
            return None

        def weights_fn(hidden: list[torch.Tensor], model) -> torch.Tensor:
            (weights,) = self.weigh([self.signal_in_forward(hidden, model, batch)], [batch.labels])
            return weights

        return weights_fn

    def metrics(self) -> dict[str, float]:
        return dict(self.record.metrics)

    def artifacts(self) -> dict[str, str]:
        return self.record.artifacts()

    def histograms(self) -> dict[str, Histogram]:
        return self.record.histograms()


def check_in_forward(section: str, scoring: str, context: SchemeContext) -> None:
    """`<section>.scoring: in_forward` makes the weights inside each micro-batch's forward, after the step's loss
    normaliser was taken: only token_mean, whose normaliser does not depend on the weights, allows that."""
    reduction = context.recipe.loss.reduction
    if scoring == "in_forward" and reduction != "token_mean":
        raise ConfigError(f"{context.recipe.source}: {section}.scoring: in_forward makes the weights inside each "
                          "micro-batch's forward, after the step's loss normaliser; it needs loss.reduction "
                          f"token_mean, not {reduction}")
