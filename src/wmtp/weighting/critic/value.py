"""The critic's value function (docs/method.md §5.3): the value head on the trunk, its targets and per-token
signal, its files, and stage 1, which fits it with the trunk frozen.

Stage 1 takes its micro-batches from the trainer's step plan (one micro-batch a step: same micro-batch size,
shuffle seed and epoch order, this rank's slice). The loss is MSE over the valid, non-terminal positions against
Monte-Carlo or TD(λ) targets (bootstrapped from the current head, detached), normalised by the target count over
all ranks. Every `eval_every` steps: held-out value loss and explained variance over the trainer's validation
rows, the trainer's early stopper, and a stage-1 checkpoint (`critic/stage1/`: components/checkpoint.py's small
checkpoint, the trainer's serializers without model shards). The best head by held-out loss (the last one
without validation data) becomes `critic/value_head.safetensors`, which marks stage 1 done. The scheme itself
(settings, weights, stage 2) is `scheme.py`, which builds on this module.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ...components.checkpoint import (
    SMALL_STATE_FILE,
    load_optimizer_tensors,
    load_small_checkpoint,
    optimizer_tensors,
    save_small_checkpoint,
)
from ...components.early_stopping import EarlyStopper
from ...components.validate import validation_rows
from ...config import ConfigError, EarlyStopping
from ...data.sequences import SequenceSet
from ...runtime import distributed as dist_utils
from ...runtime.atomic import atomic_file
from ...runtime.distributed import DistInfo, all_gather_concat
from ...runtime.storage import local_path
from .returns import TokenRewards, explained_variance, gae, mc_returns, td_errors, td_lambda_targets

if TYPE_CHECKING:
    from ...data.steps import StepPlan
    from ..base import RunHooks

VALUE_HEAD_FILE = "value_head.safetensors"
STAGE1_DIR = "critic"
STAGE1_STATE_DIR = "stage1"  # under STAGE1_DIR: the stage-1 checkpoint
VALUE_LOSS = "val/critic_value_loss"  # the held-out metric stage 1's early stopper watches


class ValueHead(nn.Module):
    """V(s_t) from the trunk's hidden state at t: LayerNorm, then a Tanh MLP of width `width` (0: linear).
    Runs in fp32 whatever the trunk's dtype. z: [B, S, D] -> [B, S]."""

    def __init__(self, hidden_size: int, width: int) -> None:
        super().__init__()
        self.hidden_size, self.width = hidden_size, width
        self.norm = nn.LayerNorm(hidden_size)
        self.net = (nn.Linear(hidden_size, 1) if width == 0 else
                    nn.Sequential(nn.Linear(hidden_size, width), nn.Tanh(), nn.Linear(width, 1)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        with torch.autocast(z.device.type, enabled=False):
            return self.net(self.norm(z.float())).squeeze(-1)


def save_value_head(head: ValueHead, path: Path, metadata: dict[str, str]) -> None:
    """safetensors with the shape and how it was trained in the metadata; written atomically."""
    meta = {"hidden_size": str(head.hidden_size), "width": str(head.width), **metadata}
    with atomic_file(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, tmp, metadata=meta)


def sum_gradients(module: nn.Module, info: DistInfo, *, average: bool = False) -> None:
    """Sum (or average) a replicated module's gradients over the ranks: the value head lives outside DDP/FSDP."""
    if not info.distributed:
        return
    for p in module.parameters():
        if p.grad is not None:
            dist_utils.all_reduce_sum(p.grad, info)
            if average:
                p.grad /= info.world_size


def value_head_file(spec: str | Path) -> Path:
    """A value-head file, or a directory holding one (a run directory, its critic/ or a final model)."""
    path = Path(local_path(str(spec), "critic.value_head_path"))
    for candidate in (path, path / VALUE_HEAD_FILE, path / STAGE1_DIR / VALUE_HEAD_FILE):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"critic.value_head_path {spec}: no {VALUE_HEAD_FILE} there")


def load_value_head(spec: str | Path, hidden_size: int) -> tuple[ValueHead, dict[str, str]]:
    path = value_head_file(spec)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    if int(meta.get("hidden_size", -1)) != hidden_size:
        raise ConfigError(f"{path}: a value head for hidden size {meta.get('hidden_size')}, the model's is "
                          f"{hidden_size}")
    head = ValueHead(hidden_size, int(meta["width"]))
    head.load_state_dict(tensors)
    return head, meta


class ValueFunction:
    """The value head on the trunk and what is computed from it: targets (Monte-Carlo or TD(λ)), the per-token
    signal (TD error δ or the GAE advantage) and held-out quality. `wrapped` is the model the trainer steps (the
    trunk forward goes through it, so FSDP2's collectives stay matched across ranks)."""

    def __init__(self, head: ValueHead, wrapped: nn.Module, autocast, info: DistInfo, *, gamma: float, lam: float,
                 target: str, advantage: str, train_rewards: TokenRewards, val_rewards: TokenRewards | None,
                 val_set: SequenceSet | None, batch_size: int, eval_batches: int | None) -> None:
        self.head, self.wrapped, self.autocast, self.info = head, wrapped, autocast, info
        self.gamma, self.lam, self.target, self.advantage = gamma, lam, target, advantage
        self.train_rewards, self.val_rewards, self.val_set = train_rewards, val_rewards, val_set
        self.batch_size, self.eval_batches = batch_size, eval_batches

    def trunk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The trunk's hidden state [B, S, D], without gradient."""
        with torch.no_grad(), self.autocast:
            return self.wrapped(input_ids, attention_mask).trunk_hidden

    def targets(self, values: torch.Tensor, tr: TokenRewards, attention_mask: torch.Tensor,
                document_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.target == "mc":
            return mc_returns(tr, attention_mask, self.gamma)
        return td_lambda_targets(values, tr, attention_mask, document_ids, self.gamma, self.lam)

    def signal(self, values: torch.Tensor, tr: TokenRewards, attention_mask: torch.Tensor,
               document_ids: torch.Tensor) -> torch.Tensor:
        """Per target token: δ or the GAE advantage, 0 where undefined. [B, S]."""
        delta, defined = td_errors(values, tr, attention_mask, document_ids, self.gamma)
        return delta if self.advantage == "td" else gae(delta, defined, self.gamma, self.lam)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out value loss (against the configured targets) and explained variance (against the
        Monte-Carlo returns), over this rank's share of the validation rows."""
        val_set = self.val_set
        if val_set is None or self.val_rewards is None:
            return {}
        self.head.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.info.device)
        preds, truths = [], []
        for rows, measured in validation_rows(len(val_set), self.batch_size, self.eval_batches, self.info):
            batch = {k: v.to(self.info.device) for k, v in val_set.select(rows).items()}
            values = self.head(self.trunk(batch["input_ids"], batch["attention_mask"]))
            if not measured:
                continue
            tr = self.val_rewards.select(rows, self.info.device)
            target, mask = self.targets(values, tr, batch["attention_mask"], batch["document_ids"])
            sums += torch.stack([torch.where(mask, (values - target) ** 2, 0.0).sum().double(),
                                 mask.sum().double()])
            mc, mc_mask = mc_returns(tr, batch["attention_mask"], self.gamma)
            preds.append(values[mc_mask])
            truths.append(mc[mc_mask])
        dist_utils.all_reduce_sum(sums, self.info)
        self.head.train()
        pred = all_gather_concat(torch.cat(preds) if preds else torch.zeros(0, device=self.info.device),
                                 self.info)[0]
        truth = all_gather_concat(torch.cat(truths) if truths else torch.zeros(0, device=self.info.device),
                                  self.info)[0]
        out = {VALUE_LOSS: float(sums[0] / sums[1].clamp_min(1))}
        ev = explained_variance(pred, truth, torch.ones_like(pred, dtype=torch.bool))
        if ev is not None:
            out["val/critic_explained_variance"] = ev
        return out


def gradient_cv(norms: list[float]) -> float:
    """Coefficient of variation of gradient norms (std / mean); inf when undefined."""
    if len(norms) < 2 or statistics.mean(norms) == 0:
        return math.inf
    return statistics.pstdev(norms) / statistics.mean(norms)


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under `<prefix>/`, by the rest of their names."""
    return {k.removeprefix(prefix + "/"): v for k, v in tensors.items() if k.startswith(prefix + "/")}


def save_stage1(directory: Path, head: ValueHead, optimizer: torch.optim.Optimizer, stopper: EarlyStopper,
                step: int, best_step: int, best: dict[str, torch.Tensor]) -> None:
    """Stage-1 checkpoint (a small checkpoint: components/checkpoint.py): the head, the best head so far and the
    optimizer as tensors; the step, the early stopper's state and the best head's step as the trainer state."""
    optim, groups = optimizer_tensors(optimizer, "optim")
    tensors = {**{f"head/{k}": v for k, v in head.state_dict().items()},
               **{f"best/{k}": v for k, v in best.items()}, **optim}
    save_small_checkpoint(directory, tensors, {"step": step, **stopper.state(), "best_step": best_step,
                                               "param_groups": groups})


def load_stage1(directory: Path, head: ValueHead, optimizer: torch.optim.Optimizer, stopper: EarlyStopper,
                device: torch.device) -> tuple[int, int, dict[str, torch.Tensor]]:
    """Restore head, optimizer and early stopper from a stage-1 checkpoint; returns (step, best head's step, best
    head)."""
    tensors, state = load_small_checkpoint(directory)
    head.load_state_dict(prefixed(tensors, "head"))
    head.to(device)
    load_optimizer_tensors(optimizer, tensors, state["param_groups"], "optim")
    stopper.load_state(state)
    return state["step"], state["best_step"], {k: v.to(device) for k, v in prefixed(tensors, "best").items()}


def check_stage1(p, train_set: SequenceSet, val_set: SequenceSet | None, plan: StepPlan) -> None:
    """Set-up checks of stage 1's settings `p` against the data (so `--dry-run` reports them)."""
    if p.early_stopping != "none" and val_set is None:
        raise ConfigError("recipe pretrain.early_stopping needs validation data (validation_fraction > 0 or "
                          "`validation` sources), or early_stopping: none")
    if len(train_set) // (plan.micro_batch_size * plan.world_size) == 0:
        raise ConfigError("critic stage 1: fewer training sequences than one micro-batch per rank")

def stage1_plan(plan: StepPlan, n_sequences: int, max_steps: int) -> StepPlan:
    """The trainer's step plan with one micro-batch a step (stage 1 accumulates nothing), so that an epoch holds
    every complete micro-batch of all ranks."""
    per_epoch = n_sequences // (plan.micro_batch_size * plan.world_size)
    return dataclasses.replace(plan, grad_accum_steps=1, steps_per_epoch=per_epoch, total_steps=max_steps)


def stage1_stopper(p) -> EarlyStopper:
    """The trainer's early stopper on the held-out value loss. It tracks the best head in every mode; whether it
    may stop the stage is `pretrain.early_stopping`'s (see `pretrain_value_head`)."""
    return EarlyStopper(EarlyStopping(metric=VALUE_LOSS, mode="min", patience=p.patience, min_delta=p.min_delta))


def stage1_step(vf: ValueFunction, optimizer: torch.optim.Optimizer, train_set: SequenceSet,
                rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One value-head step on this rank's micro-batch `rows`: (its loss, the target count over all ranks that
    normalises it, the gradient norm)."""
    info, head = vf.info, vf.head
    batch = {k: v.to(info.device) for k, v in train_set.select(rows).items()}
    tr = vf.train_rewards.select(rows, info.device)
    values = head(vf.trunk(batch["input_ids"], batch["attention_mask"]))
    target, mask = vf.targets(values.detach(), tr, batch["attention_mask"], batch["document_ids"])
    count = dist_utils.all_reduce_sum(mask.sum().float(), info).clamp_min(1)
    loss = torch.where(mask, (values - target) ** 2, torch.zeros((), device=values.device)).sum() / count
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    sum_gradients(head, info)  # the loss is already normalised by the count over all ranks
    norm = float(torch.stack([param.grad.norm() for param in head.parameters() if param.grad is not None]).norm())
    optimizer.step()
    return loss, count, norm


def stage1_metrics(loss: torch.Tensor, count: torch.Tensor, norms: list[float], evaluation: dict[str, float],
                   info: DistInfo) -> dict[str, float]:
    """What stage 1 logs at an evaluation: the last step's value loss over all ranks, its gradient norm and the
    norms' coefficient of variation since the previous evaluation, the held-out value loss and explained variance
    (an undefined value is left out, not logged as a number)."""
    loss_sum = dist_utils.all_reduce_sum(loss.detach() * count, info)
    metrics = {"critic_pretrain/train_value_loss": float(loss_sum / count), "critic_pretrain/grad_norm": norms[-1],
               "critic_pretrain/grad_cv": gradient_cv(norms),
               **{k.replace("val/critic_", "critic_pretrain/val_"): v for k, v in evaluation.items()}}
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


def pretrain_value_head(vf: ValueFunction, p, train_set: SequenceSet, plan: StepPlan, run: RunHooks,
                        meta: dict[str, str]) -> dict[str, str]:
    """Stage 1 with settings `p` (recipe `pretrain`): fit `vf.head` on the frozen trunk. Returns metadata of the
    result (`meta` added), with status "completed" or "stopped" (a signal: state saved, resumable). The settings
    were checked against the data in set-up (`check_stage1`)."""
    info, head = vf.info, vf.head
    steps = stage1_plan(plan, len(train_set), p.max_steps)
    optimizer = torch.optim.AdamW(head.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    stopper = stage1_stopper(p)
    directory = run.run_dir / STAGE1_DIR / STAGE1_STATE_DIR
    step, best_step = 0, 0
    best = {k: v.detach().clone() for k, v in head.state_dict().items()}
    if (directory / SMALL_STATE_FILE).is_file():
        step, best_step, best = load_stage1(directory, head, optimizer, stopper, info.device)
    norms: list[float] = []
    status, reason = "completed", f"max_steps {p.max_steps}"
    head.train()
    while step < p.max_steps:
        loss, count, norm = stage1_step(vf, optimizer, train_set, steps.micro_batch_rows(step, info.rank,
                                                                                         len(train_set)))
        norms.append(norm)
        step += 1
        stop = False
        if step % p.eval_every == 0 or step == p.max_steps:
            evaluation = vf.evaluate()
            run.log_metrics(stage1_metrics(loss, count, norms, evaluation, info), step)
            improved = stopper.observe(evaluation)
            if improved:
                best_step, best = step, {k: v.detach().clone() for k, v in head.state_dict().items()}
            # loss_and_gradient: an exhausted patience stops the stage only once the gradient norm is stable
            stop = (improved is not None and p.early_stopping != "none" and stopper.exhausted()
                    and (p.early_stopping == "loss" or gradient_cv(norms) <= p.grad_cv_max))
            if stop:
                reason = (f"early stopping ({p.early_stopping}): held-out value loss did not improve for "
                          f"{p.patience} evaluations")
            norms = []
            if info.is_main:
                save_stage1(directory, head, optimizer, stopper, step, best_step, best)
            if stop:
                break
        if run.stop_requested():
            if info.is_main:
                save_stage1(directory, head, optimizer, stopper, step, best_step, best)
            status, reason = "stopped", "stopped by a signal"
            break
    if status == "stopped":
        return {"status": status, "reason": reason, "steps": str(step)}
    if stopper.best is not None:
        head.load_state_dict(best)
    meta = {"status": "completed", "reason": reason, "steps": str(step), "best_step": str(best_step),
            "best_val_value_loss": str(stopper.best), **meta}
    if info.is_main:
        save_value_head(head, directory.parent / VALUE_HEAD_FILE, meta)
    if info.distributed:
        torch.distributed.barrier()
    return meta
