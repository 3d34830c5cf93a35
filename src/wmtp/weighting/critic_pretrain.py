"""Critic-WMTP stage 1: fit the value head on the frozen trunk (recipe `pretrain`).

Batches follow the trainer's own order (same micro-batch size and shuffle seed, this rank's slice). The loss is
MSE over the valid, non-terminal positions against Monte-Carlo or TD(λ) targets (bootstrapped from the current
head, detached), normalised by the target count over all ranks. Every `eval_every` steps: held-out value loss
and explained variance, early stopping, and a stage-1 checkpoint (`critic/stage1/`). The best head by held-out
loss (the last one without validation data) becomes `critic/value_head.safetensors`, which marks stage 1 done.
"""

from __future__ import annotations

import math

import torch

from .. import distributed as dist_utils
from ..config import ConfigError
from ..data import epoch_order
from .critic import (
    STAGE1_DIR,
    VALUE_HEAD_FILE,
    gradient_cv,
    read_stage1_state,
    save_value_head,
    sum_gradients,
    write_stage1_state,
)


def pretrain_value_head(scheme, trainer) -> dict[str, str]:
    """Run stage 1 for `scheme` (a CriticWeighting) inside `trainer`; returns metadata of the result, with
    status "completed" or "stopped" (a signal: state saved, resumable)."""
    p, info, head = scheme.p, scheme.info, scheme.head
    train_set, val_set = trainer.s.train_set, trainer.s.val_set
    if p.early_stopping != "none" and val_set is None:
        raise ConfigError("recipe pretrain.early_stopping needs validation data (validation_fraction > 0 or "
                          "`validation` sources), or early_stopping: none")
    mb = trainer.recipe.train.micro_batch_size
    per_epoch = len(train_set) // (mb * info.world_size)
    if per_epoch == 0:
        raise ConfigError("critic stage 1: fewer training sequences than one micro-batch per rank")
    optimizer = torch.optim.AdamW(head.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    directory = trainer.run_dir / STAGE1_DIR
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
        order = epoch_order(len(train_set), trainer.recipe.data.shuffle_seed, epoch)
        start = within * mb * info.world_size + info.rank * mb
        rows = order[start:start + mb]
        batch = {k: v.to(info.device) for k, v in train_set.select(rows).items()}
        tr = scheme.train_rewards.select(rows, info.device)
        z = scheme.trunk(batch["input_ids"], batch["attention_mask"])
        values = head(z)
        target, mask = scheme.targets(values.detach(), tr, batch["attention_mask"], batch["document_ids"])
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
            evaluation = scheme.evaluate(val_set, mb, trainer.recipe.train.eval_batches)
            metrics.update({k.replace("val/critic_", "critic_pretrain/val_"): v for k, v in evaluation.items()})
            trainer.tracker.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step)
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
        if trainer._stop_requested():
            if info.is_main:
                write_stage1_state(directory / "stage1", head, optimizer, state, best_state)
            status, reason = "stopped", "stopped by a signal"
            break
    if status == "completed":
        if state["best"] is not None:
            head.load_state_dict(best_state)
        meta = {"status": "completed", "reason": reason, "steps": str(state["step"]),
                "best_step": str(state["best_step"]), "best_val_value_loss": str(state["best"]),
                "target": scheme.s.target, "gamma": str(scheme.s.gamma), "lam": str(scheme.s.lam),
                "reward": scheme.s.reward.kind}
        if info.is_main:
            save_value_head(head, directory / VALUE_HEAD_FILE, meta)
        if info.distributed:
            torch.distributed.barrier()
        return meta
    return {"status": status, "reason": reason, "steps": str(state["step"])}

