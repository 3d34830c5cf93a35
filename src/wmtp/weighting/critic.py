"""Critic-WMTP (REFERENCE.md §4, Critic): a value head on the trunk decides which tokens matter.

Stage 1 (`pretrain`): the trunk is frozen; the value head fits Monte-Carlo or TD(λ) targets by MSE over valid
positions, with its own optimizer, held-out early stopping, checkpoints (`critic/stage1/`) and a final
`critic/value_head.safetensors`. Skipped when `critic.value_head_path` is given.

Stage 2 (training): per step, a no-grad pass gives V on every micro-batch; the TD error δ (or the GAE
advantage) of each target token is mapped to heads by the one convention (w[t, h] ← signal[t+1+h]),
standardised per head over the step's valid pairs (all micro-batches, all ranks), exponentiated exp(z/T) and
`mean1_clip`ped: detached weights. The value head keeps learning from an auxiliary loss c·MSE against TD(λ)
(or MC) targets, in its own optimizer with its own learning rate and schedule; that loss also reaches the
trunk (a shared network, as in actor-critic), scaled by c.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .. import distributed as dist_utils
from ..atomic import atomic_directory, atomic_file
from ..config import ConfigError
from ..critic_math import (
    TokenRewards,
    explained_variance,
    gae,
    mc_returns,
    td_errors,
    td_lambda_targets,
)
from ..distributed import DistInfo, all_gather_concat
from ..loss import IGNORE_INDEX, mean1_clip, per_target_to_heads
from .base import StepBatch, WeightingScheme, gather_head, histogram_artifact, scatter_head, weight_histogram

VALUE_HEAD_FILE = "value_head.safetensors"
STAGE1_DIR = "critic"


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
    path = Path(spec)
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


def _optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as flat tensors plus its JSON-able param groups (no pickles in checkpoints)."""
    state = optimizer.state_dict()
    tensors = {f"{prefix}/{i}/{k}": torch.as_tensor(v).detach().cpu().contiguous()
               for i, per in state["state"].items() for k, v in per.items()}
    return tensors, state["param_groups"]


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list,
                    prefix: str) -> None:
    per: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "/"):
            _, index, name = key.split("/")
            per.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per, "param_groups": groups})


class CriticWeighting(WeightingScheme):
    name = "critic"

    def __init__(self, settings, pretrain, recipe, model: nn.Module, wrapped: nn.Module, autocast,
                 info: DistInfo, train_rewards: TokenRewards, val_rewards: TokenRewards | None, hidden_size: int,
                 total_steps: int, lr_lambda: Callable) -> None:
        self.s, self.p, self.recipe = settings, pretrain, recipe
        self.model, self.wrapped, self.autocast, self.info = model, wrapped, autocast, info
        self.train_rewards, self.val_rewards = train_rewards, val_rewards
        self.stage1_done = False
        self.stage1_meta: dict[str, str] = {}
        if settings.value_head_path is not None:
            self.head, self.stage1_meta = load_value_head(settings.value_head_path, hidden_size)
            self.stage1_done = True
        else:
            with torch.random.fork_rng(devices=[]):  # the same value head on every rank; global RNG untouched
                torch.manual_seed(0)
                self.head = ValueHead(hidden_size, settings.value_hidden)
        self.head.to(info.device)
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=settings.value_lr, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lr_lambda(settings.value_schedule, total_steps))
        self._metrics: dict[str, float] = {}
        self._targets: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._value_count = torch.ones((), device=info.device)
        self._value_loss_sum = torch.zeros((), dtype=torch.float64, device=info.device)
        self.histogram: torch.Tensor | None = None

    # ---------------------------------------------------------------------------------------- shared pieces
    def trunk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The trunk's hidden state [B, S, D], without gradient."""
        with torch.no_grad(), self.autocast:
            return self.wrapped(input_ids, attention_mask).trunk_hidden

    def targets(self, values: torch.Tensor, tr: TokenRewards, attention_mask: torch.Tensor,
                document_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.s.target == "mc":
            return mc_returns(tr, attention_mask, self.s.gamma)
        return td_lambda_targets(values, tr, attention_mask, document_ids, self.s.gamma, self.s.lam)

    def signal(self, values: torch.Tensor, tr: TokenRewards, attention_mask: torch.Tensor,
               document_ids: torch.Tensor) -> torch.Tensor:
        """Per target token: δ or the GAE advantage, 0 where undefined. [B, S]."""
        delta, defined = td_errors(values, tr, attention_mask, document_ids, self.s.gamma)
        return delta if self.s.advantage == "td" else gae(delta, defined, self.s.gamma, self.s.lam)

    # ---------------------------------------------------------------------------------------------- stage 2
    def step_weights(self, batches: list[StepBatch]) -> list[torch.Tensor | None]:
        signals, self._targets = [], []
        count = torch.zeros((), device=self.info.device)
        self.head.eval()
        for b in batches:
            tr = self.train_rewards.select(b.rows, self.info.device)
            docs = b.document_ids
            with torch.no_grad():
                values = self.head(self.trunk(b.input_ids, b.attention_mask))
            target, mask = self.targets(values, tr, b.attention_mask, docs)
            self._targets.append((target, mask))
            count += mask.sum()
            signals.append(per_target_to_heads(self.signal(values, tr, b.attention_mask, docs), b.labels.shape[-1]))
        self._value_count = dist_utils.all_reduce_sum(count, self.info).clamp_min(1)
        self._value_loss_sum = torch.zeros((), dtype=torch.float64, device=self.info.device)
        weights, self._metrics, histogram = critic_weights(signals, [b.labels for b in batches],
                                                           temperature=self.s.temperature, eps=self.s.eps,
                                                           w_max=self.s.w_max, info=self.info)
        self.histogram = histogram if self.histogram is None else self.histogram + histogram
        self.head.train()
        return weights

    def auxiliary_loss(self, index: int, batch: StepBatch, out) -> torch.Tensor:
        """c · Σ_mask (V − target)² / (the step's target count over all ranks), for micro-batch `index`."""
        target, mask = self._targets[index]
        values = self.head(out.trunk_hidden)
        squared = torch.where(mask, (values - target) ** 2, torch.zeros((), device=values.device)).sum()
        self._value_loss_sum += squared.detach().double()
        return self.s.aux_coef * squared / self._value_count

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
        self._metrics["critic/value_loss"] = float(loss)
        self._metrics["critic/value_lr"] = self.scheduler.get_last_lr()[0]

    def metrics(self) -> dict[str, float]:
        return self._metrics

    # ------------------------------------------------------------------------------------------- validation
    @torch.no_grad()
    def evaluate(self, val_set, batch_size: int, max_batches: int | None = None) -> dict[str, float]:
        """Held-out value loss (against the configured targets) and explained variance (against the
        Monte-Carlo returns), over this rank's share of the validation rows."""
        if val_set is None or self.val_rewards is None:
            return {}
        self.head.eval()
        n_batches = math.ceil(len(val_set) / batch_size)
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        sums = torch.zeros(2, dtype=torch.float64, device=self.info.device)
        preds, truths = [], []
        per_rank = math.ceil(n_batches / self.info.world_size)
        for i in range(per_rank):  # the same number of forwards on every rank (FSDP2 collectives)
            b = i * self.info.world_size + self.info.rank
            rows = torch.arange(b * batch_size, min((b + 1) * batch_size, len(val_set))) if b < n_batches else \
                torch.arange(min(batch_size, len(val_set)))
            batch = {k: v.to(self.info.device) for k, v in val_set.select(rows).items()}
            values = self.head(self.trunk(batch["input_ids"], batch["attention_mask"]))
            if b >= n_batches:
                continue
            tr = self.val_rewards.select(rows, self.info.device)
            target, mask = self.targets(values, tr, batch["attention_mask"], batch["document_ids"])
            sums += torch.stack([torch.where(mask, (values - target) ** 2, 0.0).sum().double(),
                                 mask.sum().double()])
            mc, mc_mask = mc_returns(tr, batch["attention_mask"], self.s.gamma)
            preds.append(values[mc_mask])
            truths.append(mc[mc_mask])
        dist_utils.all_reduce_sum(sums, self.info)
        self.head.train()
        pred = all_gather_concat(torch.cat(preds) if preds else torch.zeros(0, device=self.info.device),
                                 self.info)[0]
        truth = all_gather_concat(torch.cat(truths) if truths else torch.zeros(0, device=self.info.device),
                                  self.info)[0]
        out = {"val/critic_value_loss": float(sums[0] / sums[1].clamp_min(1))}
        ev = explained_variance(pred, truth, torch.ones_like(pred, dtype=torch.bool))
        if ev is not None:
            out["val/critic_explained_variance"] = ev
        return out

    # -------------------------------------------------------------------------------------------- stage 1
    def before_training(self, trainer) -> None:
        """Stage 1, unless a value head was given, restored from a checkpoint, or already trained in this run
        directory (its critic/value_head.safetensors): the stage 1 → stage 2 handoff on resume."""
        done = trainer.run_dir / STAGE1_DIR / VALUE_HEAD_FILE
        if not self.stage1_done and done.is_file():
            head, self.stage1_meta = load_value_head(done, self.head.hidden_size)
            self.head.load_state_dict(head.state_dict())
            self.stage1_done = True
        if self.stage1_done:
            return
        from .critic_pretrain import pretrain_value_head

        self.stage1_meta = pretrain_value_head(self, trainer)
        self.stage1_done = self.stage1_meta.get("status") == "completed"

    # ------------------------------------------------------------------------------------- state and files
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"head/{k}": v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
        optim, groups = _optimizer_tensors(self.optimizer, "optim")
        return {**tensors, **optim}, {"param_groups": groups, "scheduler": self.scheduler.state_dict(),
                                      "stage1_done": self.stage1_done, "stage1": self.stage1_meta}

    def load_state(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        self.head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head/")})
        self.head.to(self.info.device)
        _load_optimizer(self.optimizer, tensors, state["param_groups"], "optim")
        self.scheduler.load_state_dict(state["scheduler"])
        self.stage1_done, self.stage1_meta = state["stage1_done"], state["stage1"]

    def finish(self, directory: Path) -> None:
        """Write the value head next to the final model, reusable as critic.value_head_path."""
        save_value_head(self.head, directory / VALUE_HEAD_FILE, {**self.stage1_meta, "stage": "2"})

    def artifacts(self) -> dict[str, str]:
        return histogram_artifact("critic", self.histogram)


def critic_weights(signals: list[torch.Tensor], labels: list[torch.Tensor], *, temperature: float, eps: float,
                   w_max: float, info: DistInfo) -> tuple[list[torch.Tensor], dict[str, float], torch.Tensor]:
    """Detached weights [B, S, n] per micro-batch from the per-pair signal: per head over the step's valid pairs
    (all ranks) z = standardised signal, w = mean1_clip(exp(z/T)). Also per-head metrics (signal mean/std,
    weight mean/std/max, normalised weight entropy H/log N, 1 = uniform) and weight histograms."""
    valid = [lab != IGNORE_INDEX for lab in labels]
    weights = [torch.zeros_like(s) for s in signals]
    metrics: dict[str, float] = {}
    histograms = []
    for h in range(labels[0].shape[-1]):
        values, offset, local_count = gather_head(signals, valid, h, info)
        count = values.numel()
        if count == 0:
            histograms.append(weight_histogram(values))
            continue
        mean, std = values.mean(), values.std(unbiased=False)
        z = (values - mean) / std if float(std) > 0 else torch.zeros_like(values)
        head_w = mean1_clip(torch.exp(z / temperature), torch.ones_like(values, dtype=torch.bool), eps=eps,
                            w_max=w_max)
        p = head_w / head_w.sum()
        entropy = float(-(p * p.clamp_min(1e-30).log()).sum()) / math.log(count) if count > 1 else 1.0
        metrics.update({f"critic/signal_mean_head{h}": float(mean), f"critic/signal_std_head{h}": float(std),
                        f"critic/weight_mean_head{h}": float(head_w.mean()),
                        f"critic/weight_std_head{h}": float(head_w.std(unbiased=False)),
                        f"critic/weight_max_head{h}": float(head_w.max()),
                        f"critic/weight_entropy_head{h}": entropy})
        histograms.append(weight_histogram(head_w))
        scatter_head(weights, valid, h, head_w[offset:offset + local_count])
    return weights, metrics, torch.stack(histograms)


def gradient_cv(norms: list[float]) -> float:
    """Coefficient of variation of gradient norms (std / mean); inf when undefined."""
    if len(norms) < 2 or statistics.mean(norms) == 0:
        return math.inf
    return statistics.pstdev(norms) / statistics.mean(norms)


def write_stage1_state(directory: Path, head: ValueHead, optimizer, state: dict,
                       best: dict[str, torch.Tensor]) -> None:
    """Stage-1 checkpoint: one directory replaced atomically (head, best head so far and optimizer as
    safetensors, state as JSON)."""
    with atomic_directory(directory) as tmp:
        tensors = {f"head/{k}": v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
        best_tensors = {f"best/{k}": v.detach().cpu().contiguous() for k, v in best.items()}
        optim, groups = _optimizer_tensors(optimizer, "optim")
        save_file({**tensors, **best_tensors, **optim}, tmp / "state.safetensors")
        (tmp / "state.json").write_text(json.dumps({**state, "param_groups": groups}))


def read_stage1_state(directory: Path, head: ValueHead, optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore head and optimizer from a stage-1 checkpoint; returns its state and the best head so far."""
    with safe_open(str(directory / "state.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    state = json.loads((directory / "state.json").read_text())
    head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head/")})
    _load_optimizer(optimizer, tensors, state["param_groups"], "optim")
    return state, {k[5:]: v for k, v in tensors.items() if k.startswith("best/")}
