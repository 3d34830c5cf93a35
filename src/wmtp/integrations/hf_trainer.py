"""`WMTPTrainer`: Hugging Face's `transformers.Trainer` training an `MTPModel` with wmtp's weighted MTP loss and one of
its weighting schemes (docs/hf-trainer.md).

One optimizer step is wmtp's own step in one process (`training.trainer.Trainer.train_step`): the Trainer collects
the step's micro-batches first (`get_batch_samples`); the scheme makes their weights over the whole step
(`step_weights`, a no-grad scoring pass of the current model for a separate-pass scheme); the loss denominator is
summed over the step's micro-batches (docs/method.md §3); each micro-batch's loss is the fused weighted loss over that
denominator, with a one-forward scheme's weights made inside the forward (`weights_in_forward`). The Trainer adds the
micro-batches' losses and gradients, so the step's loss and gradients are those of `wmtp train` on the same rows.

Labels. A Trainer batch carries `input_ids`, `attention_mask` and `labels` [B, S] in Hugging Face's unshifted
causal-LM convention: labels[j] is the target of the prediction made at position j − 1, −100 is no target. wmtp's
pair (t, h) targets x[t+1+h] (docs/method.md §1), so it is ignored wherever labels[t+1+h] is −100 (`hf_mtp_labels`):
head 0's pairs are those of Hugging Face's own next-token loss; a prompt masked with −100 is no target of any head.

Schemes: those whose weights need only the batch, the model and frozen models (`BRIDGED`): baseline-mtp, gradnorm,
dpace, and rho1 with a reference model. The critic (a value head trained in a stage of its own, on rewards), GRPO
(rollouts and rewards) and hybrid (parts built from a wmtp run's context) need wmtp's own trainer.
"""

from __future__ import annotations

import os
import tempfile
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ValidationError
from torch import nn
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from ..config import ConfigError, describe_error
from ..loss import IGNORE_INDEX, loss_denominator, mtp_labels
from ..model.mtp import HEADS_FILE, WEIGHTS_FILE, WEIGHTS_INDEX, GradNormScores, MTPLoss, MTPModel, MTPOutput
from ..runtime.distributed import DistInfo
from ..weighting import SCHEMES, plugin
from ..weighting.base import StepBatch, WeightingScheme
from ..weighting.dpace import DPaceRecipe, DPaceWeighting
from ..weighting.gradnorm import GradNormRecipe, GradNormWeighting
from ..weighting.reference import score_reference_batch
from ..weighting.rho1.scheme import Rho1Recipe, Rho1Weighting
from ..weighting.uniform import UniformSettings, UniformWeighting

WHERE = "WMTPTrainer"


def hf_mtp_labels(input_ids: torch.Tensor, labels: torch.Tensor, n_heads: int,
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """wmtp's labels [B, S, n] of a Hugging Face batch: y[t, h] = x[t+1+h], ignored where `mtp_labels` ignores it and
    where the target's Hugging Face label, labels[t+1+h], is −100 (docs/method.md §1).

    input_ids, labels, attention_mask: [B, S]; labels in Hugging Face's unshifted causal-LM convention, equal to
    input_ids wherever they are not −100 (a label that differs from its token asks for another objective)."""
    if labels.shape != input_ids.shape:
        raise ValueError(f"{WHERE}: labels must have the shape of input_ids {tuple(input_ids.shape)}, got "
                         f"{tuple(labels.shape)}")
    target = labels != IGNORE_INDEX
    if not torch.equal(labels[target], input_ids[target]):
        raise ValueError(f"{WHERE}: labels differ from input_ids where they are not -100; causal-LM labels are a copy "
                         "of input_ids with -100 on the tokens that are no target")
    return mtp_labels(input_ids, n_heads, attention_mask=attention_mask, prompt_mask=~target)


# ------------------------------------------------------------------------------------------------ the schemes
@dataclass(frozen=True)
class ScoringParts:
    """What a bridged scheme is built from. forward(batch, objective): the trainer's model on a micro-batch, without
    gradient, under the trainer's autocast; info: one process; chunk_size: valid pairs per CE chunk; reference: the
    frozen reference model or None; autocast: a fresh context of the trainer's autocast per call."""

    forward: Callable[[StepBatch, Any], MTPOutput]
    info: DistInfo
    chunk_size: int
    reference: nn.Module | None
    autocast: Callable[[], AbstractContextManager]


def only_section(settings: BaseModel) -> BaseModel:
    """The one recipe section a bridged scheme owns (its settings model has one field)."""
    (section,) = dict(settings).values()
    return section


def model_ce(parts: ScoringParts) -> Callable[[StepBatch], torch.Tensor]:
    """Each pair's CE [B, S, n] under the current model, from a no-grad pass (a separate-pass scheme's signal)."""
    return lambda batch: parts.forward(batch, MTPLoss(batch.labels, chunk_size=parts.chunk_size)).ce


def build_uniform(settings: UniformSettings, parts: ScoringParts) -> WeightingScheme:
    return UniformWeighting()


def build_gradnorm(settings: GradNormRecipe, parts: ScoringParts) -> WeightingScheme:
    def grad_norm_sq(batch: StepBatch) -> torch.Tensor:
        return parts.forward(batch, GradNormScores(batch.labels, parts.chunk_size)).grad_norm_sq

    return GradNormWeighting(only_section(settings), grad_norm_sq, parts.info, parts.chunk_size)


def build_dpace(settings: DPaceRecipe, parts: ScoringParts) -> WeightingScheme:
    return DPaceWeighting(only_section(settings), model_ce(parts), parts.info, parts.chunk_size)


def build_rho1(settings: Rho1Recipe, parts: ScoringParts) -> WeightingScheme:
    def reference_ce(batch: StepBatch) -> torch.Tensor:
        return score_reference_batch(parts.reference, batch.input_ids, batch.attention_mask, parts.autocast(),
                                     parts.chunk_size)

    return Rho1Weighting(only_section(settings), model_ce(parts), reference_ce, parts.info, parts.reference,
                         parts.chunk_size)


# a scheme's settings model (its plugin's) -> how this bridge builds it, and whether it runs a reference model
BRIDGED: dict[type[BaseModel], tuple[Callable[[Any, ScoringParts], WeightingScheme], bool]] = {
    UniformSettings: (build_uniform, False),
    GradNormRecipe: (build_gradnorm, False),
    DPaceRecipe: (build_dpace, False),
    Rho1Recipe: (build_rho1, True),
}


def bridged_scheme(algorithm: str, sections: dict[str, Any] | None, parts: ScoringParts) -> WeightingScheme:
    """The scheme `algorithm` with its recipe sections (`{"gradnorm": {"scoring": "in_forward"}}`, as a recipe
    writes them; None: the defaults), built on `parts`; a scheme that needs wmtp's own trainer is a one-line error."""
    chosen = plugin(algorithm, WHERE)
    if chosen.settings not in BRIDGED:
        supported = ", ".join(sorted(name for name in SCHEMES if plugin(name).settings in BRIDGED))
        raise ConfigError(f"{WHERE}: algorithm: {algorithm} needs wmtp's own trainer (`wmtp train`): its weights come "
                          f"from a training stage, rollouts or parts of a wmtp run (docs/hf-trainer.md); WMTPTrainer "
                          f"takes {supported}")
    build, uses_reference = BRIDGED[chosen.settings]
    if uses_reference and parts.reference is None:
        raise ConfigError(f"{WHERE}: reference_model: algorithm {algorithm} needs a frozen reference causal LM that "
                          "shares the trained model's tokenizer")
    if not uses_reference and parts.reference is not None:
        raise ConfigError(f"{WHERE}: reference_model: algorithm {algorithm} uses no reference model")
    try:
        settings = chosen.settings.model_validate(sections or {})
    except ValidationError as exc:
        raise ConfigError(describe_error(exc, f"{WHERE} scheme")) from None
    return build(settings, parts)


# ------------------------------------------------------------------------------------------------ the trainer
@dataclass(frozen=True)
class PreparedBatch:
    """One micro-batch of the step, ready for its loss: its index in the step, the batch with wmtp's labels, the
    scheme's weights [B, S, n] (None: uniform, or made in the forward) and the step's loss denominator."""

    index: int
    batch: StepBatch
    weights: torch.Tensor | None
    normalizer: torch.Tensor


class WMTPTrainer(Trainer):
    """`transformers.Trainer` for an `MTPModel` with wmtp's weighted MTP loss (module docstring).

    algorithm: a wmtp scheme that needs only the batch and frozen models (baseline-mtp, gradnorm, dpace, rho1);
    scheme: its recipe sections as a recipe writes them (`{"rho1": {"mode": "topk"}}`; None: the defaults);
    reference_model: rho1's frozen reference, a causal LM with the trained model's tokenizer; head_coef: λ_h, one per
    head (None: all 1); chunk_size: valid pairs per CE chunk. Everything else goes to `transformers.Trainer`. The
    loss is token_mean (docs/method.md §3). `save_model` writes what `MTPModel.from_pretrained` reads, the base model
    as a plain causal LM; `evaluate` reports the uniform MTP loss; training logs add each head's CE and top-1
    accuracy since the last log and the scheme's metrics of the last step."""

    loss_is_scaled_for_ga = True  # each micro-batch's loss is already over the whole step's denominator

    def __init__(self, model: MTPModel, args=None, *rest, algorithm: str = "baseline-mtp",
                 scheme: dict[str, Any] | None = None, reference_model: nn.Module | None = None,
                 head_coef: list[float] | None = None, chunk_size: int = 256, **kwargs) -> None:
        if not isinstance(model, MTPModel):
            raise TypeError(f"{WHERE}: model is a {type(model).__name__}, not an MTPModel; add the heads first: "
                            "MTPModel.from_base(model, n_heads, head_type)")
        super().__init__(model, args, *rest, **kwargs)
        if self.args.world_size > 1 or self.args.n_gpu > 1:
            raise ConfigError(f"{WHERE}: runs in one process on one device (world size {self.args.world_size}, "
                              f"{self.args.n_gpu} GPUs); train on several with `wmtp train` under torchrun")
        if self.args.activation_checkpointing:  # (gradient_checkpointing, its deprecated alias, sets it too)
            raise ConfigError(f"{WHERE}: activation_checkpointing (gradient_checkpointing) is not supported; wmtp "
                              "train has compute.activation_checkpointing")
        if self.args.label_names is None:  # MTPModel.forward names no labels argument: keep the batches' labels
            self.label_names = ["labels"]
        self.n_heads, self.head_coef, self.chunk_size = model.n_heads, head_coef, chunk_size
        if reference_model is not None:
            reference_model = reference_model.requires_grad_(False).eval().to(self.args.device)
        info = DistInfo(rank=0, world_size=1, local_rank=0, device=self.args.device)
        self.scheme = bridged_scheme(algorithm, scheme, ScoringParts(
            self.score, info, chunk_size, reference_model, self.compute_loss_context_manager))
        self.pending: deque[PreparedBatch] = deque()
        # per head since the last log: CE summed, correct, pairs (on the device: no synchronisation per micro-batch)
        self.head_sums = torch.zeros(3, model.n_heads, device=self.args.device)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        if resume_from_checkpoint:
            raise ConfigError(f"{WHERE}: resume_from_checkpoint is not supported (the Trainer reloads a state dict "
                              "under its own names); start from MTPModel.from_pretrained(checkpoint)")
        return super().train(**kwargs)

    # one step ---------------------------------------------------------------------------------------------
    def step_batch(self, inputs: dict[str, Any]) -> StepBatch:
        """A Trainer batch as a wmtp micro-batch on the trainer's device, with wmtp's labels [B, S, n]."""
        if inputs.get("labels") is None:
            raise ValueError(f"{WHERE}: a batch without `labels`; use a causal-LM collator "
                             "(DataCollatorForLanguageModeling(tokenizer, mlm=False)) or give labels")
        if inputs.get("position_ids") is not None:
            raise ValueError(f"{WHERE}: batches with position_ids (padding-free packing) are not supported; give "
                             "padded batches with an attention_mask")
        device = self.args.device
        ids = inputs["input_ids"].to(device)
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask.to(device)
        labels = hf_mtp_labels(ids, inputs["labels"].to(device), self.n_heads, attention_mask=mask)
        return StepBatch(ids, mask, labels, rows=torch.arange(ids.shape[0], device=device))

    def prepare_step(self, samples: list[dict[str, Any]]) -> deque[PreparedBatch]:
        """The step's micro-batches with the scheme's weights over the whole step and the step's denominator."""
        batches = [self.step_batch(sample) for sample in samples]
        weights = self.scheme.step_weights(batches)
        normalizer = sum(loss_denominator(b.labels, w, head_coef=self.head_coef)
                         for b, w in zip(batches, weights, strict=True))
        return deque(PreparedBatch(k, b, w, normalizer) for k, (b, w) in enumerate(zip(batches, weights, strict=True)))

    @torch.no_grad()
    def score(self, batch: StepBatch, objective: MTPLoss | GradNormScores) -> MTPOutput:
        """A scheme's scoring pass: the model being trained, under the trainer's autocast, without gradient."""
        with self.compute_loss_context_manager():
            return self.model_wrapped(batch.input_ids, batch.attention_mask, objective)

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        self.pending = self.prepare_step(samples)
        return samples, None

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        """The micro-batch's weighted MTP loss over the step's denominator (a micro-batch outside a prepared step,
        e.g. a direct call, is a step of its own)."""
        prepared = self.pending.popleft() if self.pending else self.prepare_step([inputs])[0]
        batch = prepared.batch
        if not torch.equal(batch.input_ids, inputs["input_ids"].to(batch.input_ids.device)):
            raise RuntimeError(f"{WHERE}: compute_loss got another micro-batch than the step prepared")
        out = model(batch.input_ids, batch.attention_mask, MTPLoss(
            batch.labels, prepared.weights, self.scheme.weights_in_forward(prepared.index, batch),
            head_coef=self.head_coef, normalizer=prepared.normalizer, allow_negative=self.scheme.allow_negative,
            chunk_size=self.chunk_size))
        valid = batch.labels != IGNORE_INDEX
        self.head_sums += torch.stack([out.ce.sum((0, 1)), out.correct.float().sum((0, 1)),
                                       valid.float().sum((0, 1))])
        return (out.loss, out) if return_outputs else out.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: the heads since the last one, the scheme's last step
            ce, correct, pairs = self.head_sums.double().cpu()
            heads = {}
            for h in range(self.n_heads):
                if pairs[h] > 0:
                    heads[f"ce_head{h}"] = float(ce[h] / pairs[h])
                    heads[f"acc_head{h}"] = float(correct[h] / pairs[h])
            logs = {**logs, **heads, **self.scheme.metrics()}
            self.head_sums.zero_()
        super().log(logs, start_time)

    # evaluation and saving ----------------------------------------------------------------------------------
    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None):
        """The batch's uniform MTP loss (every valid pair weighs 1, times λ_h), so runs of different schemes compare;
        no logits."""
        batch = self.step_batch(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            out = model(batch.input_ids, batch.attention_mask,
                        MTPLoss(batch.labels, head_coef=self.head_coef, chunk_size=self.chunk_size))
        return out.loss.detach(), None, None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """`MTPModel.save_pretrained` into `output_dir`, keeping what else is there (the Trainer's checkpoints):
        written beside, then moved in file by file; the previous save's weight files are removed first."""
        if not self.args.should_save:
            return
        target = Path(output_dir if output_dir is not None else self.args.output_dir)
        target.mkdir(parents=True, exist_ok=True)
        tokenizer = (self.processing_class if self.processing_class is not None
                     else getattr(self.data_collator, "tokenizer", None))
        with tempfile.TemporaryDirectory(prefix=".wmtp-save.", dir=target) as tmp:
            written = self.model.save_pretrained(Path(tmp) / "model", tokenizer=tokenizer)
            for stale in [target / WEIGHTS_FILE, target / WEIGHTS_INDEX, target / HEADS_FILE,
                          *target.glob("model-*-of-*.safetensors")]:
                stale.unlink(missing_ok=True)
            for path in written.iterdir():
                os.replace(path, target / path.name)
        torch.save(self.args, target / TRAINING_ARGS_NAME)
