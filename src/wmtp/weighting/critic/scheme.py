"""Critic-WMTP (docs/method.md §5.3): a value head on the trunk decides which tokens matter.

Stage 1 (`pretrain`): the trunk is frozen; the value head fits Monte-Carlo or TD(λ) targets by MSE over valid
positions, with its own optimizer, on the trainer's step plan, early stopper and checkpoint format (`critic/stage1/`)
and a final `critic/value_head.safetensors` (value.py). Skipped when `critic.value_head_path` is given.

Stage 2 (training): per step, a no-grad pass gives V on every micro-batch; the TD error δ (or the GAE
advantage) of each target token is mapped to heads by the one convention (w[t, h] ← signal[t+1+h]),
standardised per head over the step's valid pairs (all micro-batches, all ranks), exponentiated exp(z/T) and
`mean1_clip`ped: detached weights. The value head keeps learning from an auxiliary loss c·MSE against TD(λ)
(or MC) targets, in its own optimizer with its own learning rate and schedule; that loss also reaches the
trunk (a shared network, as in actor-critic), scaled by c.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from ...components.checkpoint import load_optimizer_tensors, optimizer_tensors
from ...components.optim import lr_lambda
from ...config import ConfigError, Schedule, Strict
from ...data.sequences import SequenceSet
from ...data.steps import StepPlan
from ...loss import IGNORE_INDEX, per_target_to_heads
from ...runtime import distributed as dist_utils
from ...runtime.distributed import DistInfo
from ...runtime.tracking import Histogram
from ..base import (
    RunHooks,
    SchemeContext,
    SchemePlugin,
    StepBatch,
    WeightingScheme,
)
from ..per_head import PerHeadRecord, PerHeadWeights, exp_weights, per_head_weights
from ..rewards import RewardSettings, make_reward
from .returns import token_rewards
from .value import (
    STAGE1_DIR,
    VALUE_HEAD_FILE,
    ValueFunction,
    ValueHead,
    check_stage1,
    load_value_head,
    pretrain_value_head,
    save_value_head,
    sum_gradients,
)


class CriticSettings(Strict):
    """Critic-WMTP stage 2: TD errors of a value head on the trunk turned into per-head weights."""

    reward: RewardSettings
    gamma: float = Field(1.0, gt=0, le=1, description="discount per token")
    lam: float = Field(0.95, ge=0, le=1, description="λ of TD(λ) value targets and of GAE")
    target: Literal["mc", "td_lambda"] = Field(
        "td_lambda", description="value targets: Monte-Carlo returns, or TD(λ) returns bootstrapped from the "
        "current value head (both stages)")
    advantage: Literal["td", "gae"] = Field(
        "td", description="per-token signal: the one-step TD error δ, or the GAE(λ) advantage")
    temperature: float = Field(1.0, gt=0, description="w = exp(z/T), z the per-head standardised signal")
    eps: float = Field(0.05, ge=0, le=1, description="mean1_clip floor: no weight lies below it")
    w_max: float = Field(3.0, ge=1, description="mean1_clip ceiling: no weight lies above it")
    value_hidden: int = Field(256, ge=0, description="width of the value head's hidden layer (0: linear)")
    value_head_path: str | None = Field(
        None, description="a value head saved by stage 1 (value_head.safetensors or its run directory): "
        "stage 1 is skipped")
    aux_coef: float = Field(0.1, ge=0, description="c of the auxiliary value loss c·MSE in stage 2")
    value_lr: float = Field(1e-4, gt=0, description="stage 2 learning rate of the value head's own group")
    value_schedule: Schedule = Field(
        default_factory=lambda: Schedule(kind="constant"), description="stage 2 schedule of the value head's lr")


class PretrainSettings(Strict):
    """Critic-WMTP stage 1: fit the value head with the trunk frozen."""

    max_steps: int = Field(200, ge=1, description="value-head optimizer steps at most")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate of the value head in stage 1 (constant)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay of the value head in stage 1")
    eval_every: int = Field(20, ge=1, description="steps between held-out value-loss evaluations")
    early_stopping: Literal["none", "loss", "loss_and_gradient"] = Field(
        "loss", description="loss: stop after `patience` evaluations without a held-out value-loss improvement "
        "> min_delta; loss_and_gradient: and only once the gradient norm is stable (coefficient of variation over "
        "the last eval_every steps <= grad_cv_max), as in the seed")
    patience: int = Field(3, ge=1, description="evaluations without an improvement before stage 1 stops")
    min_delta: float = Field(0.0, ge=0, description="smallest held-out value-loss decrease that counts as an "
                             "improvement")
    grad_cv_max: float = Field(0.5, gt=0, description="loss_and_gradient: stability threshold")

    @model_validator(mode="after")
    def _keys_of_mode(self) -> PretrainSettings:
        if "grad_cv_max" in self.model_fields_set and self.early_stopping != "loss_and_gradient":
            raise ValueError("`grad_cv_max` only applies to early_stopping: loss_and_gradient")
        if self.early_stopping == "none" and self.model_fields_set & {"patience", "min_delta"}:
            raise ValueError("`patience` and `min_delta` do not apply to early_stopping: none")
        return self


class CriticRecipe(Strict):
    """The recipe sections algorithm critic owns: `critic` (stage 2 and the reward) and `pretrain` (stage 1)."""

    critic: CriticSettings
    pretrain: PretrainSettings | None = Field(None, description="critic stage 1 (default settings when absent)")

    @model_validator(mode="after")
    def _stage1_or_head(self) -> CriticRecipe:
        if self.pretrain is not None and self.critic.value_head_path is not None:
            raise ValueError("`pretrain` is skipped when critic.value_head_path is given: remove one of them")
        return self


class CriticWeighting(WeightingScheme):
    """Stage 2 weights from the value function's per-token signal; stage 1 in `before_training` when needed."""

    def __init__(self, settings: CriticSettings, pretrain: PretrainSettings, value: ValueFunction,
                 train_set: SequenceSet, plan: StepPlan, stage1_meta: dict[str, str] | None = None) -> None:
        self.settings, self.pretrain, self.value = settings, pretrain, value
        self.head, self.info = value.head, value.info
        self.train_set, self.plan = train_set, plan
        self.stage1_done = stage1_meta is not None
        self.stage1_meta: dict[str, str] = stage1_meta or {}
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=settings.value_lr, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lr_lambda(settings.value_schedule, plan.total_steps))
        self._value_metrics: dict[str, float] = {}  # of the last step's value-head update
        self._targets: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._value_count = torch.ones((), device=self.info.device)
        self._value_loss_sum = torch.zeros((), dtype=torch.float64, device=self.info.device)
        self.record = PerHeadRecord("critic")

    # ---------------------------------------------------------------------------------------------- stage 2
    def step_weights(self, batches: list[StepBatch]) -> list[torch.Tensor | None]:
        signals, self._targets = [], []
        count = torch.zeros((), device=self.info.device)
        self.head.eval()
        for b in batches:
            tr = self.value.train_rewards.select(b.rows, self.info.device)
            docs = b.document_ids
            with torch.no_grad():
                values = self.head(self.value.trunk(b.input_ids, b.attention_mask))
            target, mask = self.value.targets(values, tr, b.attention_mask, docs)
            self._targets.append((target, mask))
            count += mask.sum()
            signal = self.value.signal(values, tr, b.attention_mask, docs)
            signals.append(per_target_to_heads(signal, b.labels.shape[-1]))
        self._value_count = dist_utils.all_reduce_sum(count, self.info).clamp_min(1)
        self._value_loss_sum = torch.zeros((), dtype=torch.float64, device=self.info.device)
        weights, metrics, histogram = critic_weights(signals, [b.labels for b in batches],
                                                     temperature=self.settings.temperature, eps=self.settings.eps,
                                                     w_max=self.settings.w_max, info=self.info)
        self.record.add(metrics, histogram)
        self.head.train()
        return weights

    def auxiliary_loss(self, index: int, batch: StepBatch, out) -> torch.Tensor:
        """c · Σ_mask (V − target)² / (the step's target count over all ranks), for micro-batch `index`."""
        target, mask = self._targets[index]
        values = self.head(out.trunk_hidden)
        squared = torch.where(mask, (values - target) ** 2, torch.zeros((), device=values.device)).sum()
        self._value_loss_sum += squared.detach().double()
        return self.settings.aux_coef * squared / self._value_count

    def after_backward(self, grad_clip: float | None) -> None:
        """Average the value head's gradients over ranks (it is not inside DDP/FSDP), clip, step its own
        optimizer and schedule."""
        sum_gradients(self.head, self.info, average=True)
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.head.parameters(), grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = dist_utils.all_reduce_sum(self._value_loss_sum.clone(), self.info) / self._value_count
        self._value_metrics = {"critic/value_loss": float(loss), "critic/value_lr": self.scheduler.get_last_lr()[0]}

    def metrics(self) -> dict[str, float]:
        return {**self.record.metrics, **self._value_metrics}

    def evaluate(self) -> dict[str, float]:
        return self.value.evaluate()

    # -------------------------------------------------------------------------------------------- stage 1
    def before_training(self, run: RunHooks) -> None:
        """Stage 1, unless a value head was given, restored from a checkpoint, or already trained in this run
        directory (its critic/value_head.safetensors): the stage 1 → stage 2 handoff on resume."""
        done = run.run_dir / STAGE1_DIR / VALUE_HEAD_FILE
        if not self.stage1_done and done.is_file():
            head, self.stage1_meta = load_value_head(done, self.head.hidden_size)
            self.head.load_state_dict(head.state_dict())
            self.stage1_done = True
        if self.stage1_done:
            return
        meta = {"target": self.settings.target, "gamma": str(self.settings.gamma), "lam": str(self.settings.lam),
                "reward": self.settings.reward.kind}
        self.stage1_meta = pretrain_value_head(self.value, self.pretrain, self.train_set, self.plan, run, meta)
        self.stage1_done = self.stage1_meta.get("status") == "completed"

    # ------------------------------------------------------------------------------------- state and files
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"head/{k}": v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
        optim, groups = optimizer_tensors(self.optimizer, "optim")
        return {**tensors, **optim}, {"param_groups": groups, "scheduler": self.scheduler.state_dict(),
                                      "stage1_done": self.stage1_done, "stage1": self.stage1_meta}

    def load_state(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        self.head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head/")})
        self.head.to(self.info.device)
        load_optimizer_tensors(self.optimizer, tensors, state["param_groups"], "optim")
        self.scheduler.load_state_dict(state["scheduler"])
        self.stage1_done, self.stage1_meta = state["stage1_done"], state["stage1"]

    def finish(self, directory: Path) -> None:
        """Write the value head next to the final model, reusable as critic.value_head_path."""
        save_value_head(self.head, directory / VALUE_HEAD_FILE, {**self.stage1_meta, "stage": "2"})

    def artifacts(self) -> dict[str, str]:
        return self.record.artifacts()

    def histograms(self) -> dict[str, Histogram]:
        return self.record.histograms()


def critic_weights(signals: list[torch.Tensor], labels: list[torch.Tensor], *, temperature: float, eps: float,
                   w_max: float, info: DistInfo) -> PerHeadWeights:
    """Detached weights [B, S, n] per micro-batch from the per-pair signal: per head over the step's valid pairs
    (all ranks) z = standardised signal, w = mean1_clip(exp(z/T)). Also per-head metrics (signal mean/std,
    weight mean/std/max, normalised weight entropy H/log N, 1 = uniform) and weight histograms."""

    def rule(head: int, values: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        mean, std = values.mean(), values.std(unbiased=False)
        return (exp_weights(values, mean, std, temperature=temperature, eps=eps, w_max=w_max),
                {"signal_mean": float(mean), "signal_std": float(std)})

    return per_head_weights(signals, [lab != IGNORE_INDEX for lab in labels], rule, info, prefix="critic",
                            stats=("weight_mean", "weight_std", "weight_max", "weight_entropy"))


# ------------------------------------------------------------------------------------------------ construction
def build(settings: CriticRecipe, context: SchemeContext) -> CriticWeighting:
    """Score every training (and validation) document with the reward, place the rewards at the documents' last
    tokens, and set up the value head: loaded from `critic.value_head_path` (stage 1 skipped) or new."""
    critic, pretrain = settings.critic, settings.pretrain or PretrainSettings()
    context.refuse_trunk_cache("critic", "runs the trunk for its value head (stage 1 and every step's values)")
    if context.config.compute.precision == "fp16":
        raise ConfigError("algorithm critic supports compute.precision fp32 and bf16 (the value head has its "
                          "own optimizer outside the fp16 gradient scaler)")
    plan, info = context.plan, context.info
    stage1_meta = None
    hidden_size = context.model.config.hidden_size
    if critic.value_head_path is not None:
        head, stage1_meta = load_value_head(critic.value_head_path, hidden_size)
    else:
        check_stage1(pretrain, context.train_set, context.val_set, plan)
        with torch.random.fork_rng(devices=[]):  # the same value head on every rank; global RNG untouched
            torch.manual_seed(0)
            head = ValueHead(hidden_size, critic.value_hidden)
    head.to(info.device)
    score = make_reward(critic.reward, device=info.device)
    train_rewards = token_rewards(context.train_set,
                                  torch.tensor(score(context.train_examples))[context.train_set.doc_examples])
    val_rewards = None
    if context.val_set is not None:
        val_rewards = token_rewards(context.val_set,
                                    torch.tensor(score(context.val_examples))[context.val_set.doc_examples])
    value = ValueFunction(head, context.wrapped, context.autocast, info, gamma=critic.gamma, lam=critic.lam,
                          target=critic.target, advantage=critic.advantage, train_rewards=train_rewards,
                          val_rewards=val_rewards, val_set=context.val_set, batch_size=plan.micro_batch_size,
                          eval_batches=plan.eval_batches)
    return CriticWeighting(critic, pretrain, value, context.train_set, plan, stage1_meta)


PLUGIN = SchemePlugin(settings=CriticRecipe, build=build)
