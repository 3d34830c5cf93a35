"""The critic's value function (docs/method.md §5.3): the value head on the trunk, its targets and per-token
signal, its files, and stage 1, which fits it with the trunk frozen.

Stage 1 batches follow the trainer's own order (same micro-batch size and shuffle seed, this rank's slice). The
loss is MSE over the valid, non-terminal positions against Monte-Carlo or TD(λ) targets (bootstrapped from the
current head, detached), normalised by the target count over all ranks. Every `eval_every` steps: held-out value
loss and explained variance, early stopping, and a stage-1 checkpoint (`critic/stage1/`). The best head by
held-out loss (the last one without validation data) becomes `critic/value_head.safetensors`, which marks stage 1
done. The scheme itself (settings, weights, stage 2) is `critic.py`, which builds on this module.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ...config import ConfigError
from ...data.sequences import SequenceSet, epoch_order
from ...runtime import distributed as dist_utils
from ...runtime.atomic import atomic_directory, atomic_file
from ...runtime.distributed import DistInfo, all_gather_concat
from ...runtime.storage import local_path
from .returns import TokenRewards, explained_variance, gae, mc_returns, td_errors, td_lambda_targets

if TYPE_CHECKING:
    from ...data.steps import StepPlan
    from ..base import RunHooks

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


def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as flat tensors plus its JSON-able param groups (no pickles in checkpoints)."""
    state = optimizer.state_dict()
    tensors = {f"{prefix}/{i}/{k}": torch.as_tensor(v).detach().cpu().contiguous()
               for i, per in state["state"].items() for k, v in per.items()}
    return tensors, state["param_groups"]


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list,
                    prefix: str) -> None:
    per: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "/"):
            _, index, name = key.split("/")
            per.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per, "param_groups": groups})


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
        val_set, batch_size, max_batches = self.val_set, self.batch_size, self.eval_batches
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
            mc, mc_mask = mc_returns(tr, batch["attention_mask"], self.gamma)
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
        optim, groups = optimizer_tensors(optimizer, "optim")
        save_file({**tensors, **best_tensors, **optim}, tmp / "state.safetensors")
        (tmp / "state.json").write_text(json.dumps({**state, "param_groups": groups}))


def read_stage1_state(directory: Path, head: ValueHead, optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore head and optimizer from a stage-1 checkpoint; returns its state and the best head so far."""
    with safe_open(str(directory / "state.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    state = json.loads((directory / "state.json").read_text())
    head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head/")})
    load_optimizer_tensors(optimizer, tensors, state["param_groups"], "optim")
    return state, {k[5:]: v for k, v in tensors.items() if k.startswith("best/")}


def check_stage1(p, train_set: SequenceSet, val_set: SequenceSet | None, plan: StepPlan) -> None:
    """Set-up checks of stage 1's settings `p` against the data (so `--dry-run` reports them)."""
    if p.early_stopping != "none" and val_set is None:
        raise ConfigError("recipe pretrain.early_stopping needs validation data (validation_fraction > 0 or "
                          "`validation` sources), or early_stopping: none")
    if len(train_set) // (plan.micro_batch_size * plan.world_size) == 0:
        raise ConfigError("critic stage 1: fewer training sequences than one micro-batch per rank")


def pretrain_value_head(vf: ValueFunction, p, train_set: SequenceSet, plan: StepPlan, run: RunHooks,
                        meta: dict[str, str]) -> dict[str, str]:
    """Stage 1 with settings `p` (recipe `pretrain`): fit `vf.head` on the frozen trunk. Returns metadata of the
    result (`meta` added), with status "completed" or "stopped" (a signal: state saved, resumable). The settings
    were checked against the data in set-up (`check_stage1`)."""
    info, head = vf.info, vf.head
    mb = plan.micro_batch_size
    per_epoch = len(train_set) // (mb * info.world_size)
    optimizer = torch.optim.AdamW(head.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    directory = run.run_dir / STAGE1_DIR
    state = {"step": 0, "best": None, "bad_evals": 0, "best_step": 0}
    best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
    if (directory / "stage1" / "state.json").is_file():
        state, best = read_stage1_state(directory / "stage1", head, optimizer)
        head.to(info.device)
        best_state = {k: v.to(info.device) for k, v in best.items()}
    norms: list[float] = []
    status = "completed"
    reason = f"max_steps {p.max_steps}"
    head.train()
    while state["step"] < p.max_steps:
        epoch, within = divmod(state["step"], per_epoch)
        order = epoch_order(len(train_set), plan.shuffle_seed, epoch)
        start = within * mb * info.world_size + info.rank * mb
        rows = order[start:start + mb]
        batch = {k: v.to(info.device) for k, v in train_set.select(rows).items()}
        tr = vf.train_rewards.select(rows, info.device)
        z = vf.trunk(batch["input_ids"], batch["attention_mask"])
        values = head(z)
        target, mask = vf.targets(values.detach(), tr, batch["attention_mask"], batch["document_ids"])
        count = dist_utils.all_reduce_sum(mask.sum().float(), info).clamp_min(1)
        loss = torch.where(mask, (values - target) ** 2, torch.zeros((), device=values.device)).sum() / count
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sum_gradients(head, info)  # the loss is already normalised by the count over all ranks
        grads = [param.grad.norm() for param in head.parameters() if param.grad is not None]
        norms.append(float(torch.stack(grads).norm()))
        optimizer.step()
        state["step"] += 1
        step = state["step"]
        last = step == p.max_steps
        if step % p.eval_every == 0 or last:
            loss_sum = dist_utils.all_reduce_sum(loss.detach() * count, info)
            metrics = {"critic_pretrain/train_value_loss": float(loss_sum / count),
                       "critic_pretrain/grad_norm": norms[-1], "critic_pretrain/grad_cv": gradient_cv(norms)}
            evaluation = vf.evaluate()
            metrics.update({k.replace("val/critic_", "critic_pretrain/val_"): v for k, v in evaluation.items()})
            run.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step)
            stop = False
            if evaluation:
                value = evaluation["val/critic_value_loss"]
                if state["best"] is None or value < state["best"] - p.min_delta:
                    state.update(best=value, bad_evals=0, best_step=step)
                    best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
                else:
                    state["bad_evals"] += 1
                if p.early_stopping != "none" and state["bad_evals"] >= p.patience:
                    stable = p.early_stopping == "loss" or gradient_cv(norms) <= p.grad_cv_max
                    if stable:
                        stop, reason = True, (f"early stopping ({p.early_stopping}): held-out value loss did not "
                                              f"improve for {p.patience} evaluations")
            norms = []
            if info.is_main:
                write_stage1_state(directory / "stage1", head, optimizer, state, best_state)
            if stop:
                break
        if run.stop_requested():
            if info.is_main:
                write_stage1_state(directory / "stage1", head, optimizer, state, best_state)
            status, reason = "stopped", "stopped by a signal"
            break
    if status == "completed":
        if state["best"] is not None:
            head.load_state_dict(best_state)
        meta = {"status": "completed", "reason": reason, "steps": str(state["step"]),
                "best_step": str(state["best_step"]), "best_val_value_loss": str(state["best"]), **meta}
        if info.is_main:
            save_value_head(head, directory / VALUE_HEAD_FILE, meta)
        if info.distributed:
            torch.distributed.barrier()
        return meta
    return {"status": status, "reason": reason, "steps": str(state["step"])}

