"""The training loop over a prepared run (`training.build.prepare`): optimizer steps that read top to bottom.

One optimizer step (`Trainer.train_step`):
1. take this rank's slice of the step's `grad_accum_steps` global micro-batches (a fixed order per epoch),
   or what the scheme trains on instead (`scheme.step_batches`: GRPO's sampled completions);
2. build per-head labels, ask the weighting scheme for detached weights over the whole step;
3. sum the loss denominators of all micro-batches, all-reduce it over ranks (the global normaliser,
   docs/method.md §3);
4. forward + backward each micro-batch on the fast path with that normaliser (gradient sync on the last);
5. clip, step the optimizer and the schedule; all-reduce and log the step's totals.
Validation, early stopping, checkpoints and SIGTERM/SIGINT are handled between steps (`Trainer.run`).
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ..components.checkpointer import Checkpointer
from ..components.early_stopping import EarlyStopper
from ..components.optim import lr_lambda, make_optimizer
from ..components.validate import head_quality, quality_metrics
from ..config import RUN_CONFIG_FILE, RUN_RECIPE_FILE, flatten, resolved_yaml
from ..data.sequences import labels_for
from ..loss import loss_denominator
from ..model import parallelize
from ..model.memory import flops_per_token, peak_flops
from ..model.mtp import MTPLoss
from ..runtime import distributed as dist_utils
from ..runtime.atomic import atomic_file
from ..runtime.mirror import RunMirror
from ..runtime.tracking import METRICS_FILE, Progress, Tracker
from ..weighting.base import RunHooks, StepBatch
from .build import RunSetup
from .totals import StepTotals


# ------------------------------------------------------------------------------------------------ trainer
class Trainer:
    def __init__(self, setup: RunSetup, run_dir: Path, *, run_name: str, tags: dict[str, str] | None = None,
                 resume: Path | None = None, config_files: tuple[Path, Path] | None = None,
                 mirror: RunMirror | None = None) -> None:
        self.setup, self.info, self.plan = setup, setup.info, setup.plan
        self.recipe, self.config = setup.recipe, setup.config
        self.model, self.wrapped, self.scheme, self.autocast = setup.model, setup.wrapped, setup.scheme, setup.autocast
        self.run_dir = run_dir
        self.optimizer = make_optimizer(self.model, self.recipe.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lr_lambda(self.recipe.schedule, self.plan.total_steps))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.config.compute.precision == "fp16")
        # saves, restores, the final model and, with a mirror (a remote output_dir), their uploads
        self.checkpointer = Checkpointer(run_dir, self.model, self.optimizer, self.scheduler, setup.tokenizer,
                                         self.info, self.config.checkpoint, self.config.mlflow, mirror)
        self.flops_per_token = flops_per_token(self.model, self.recipe.data.max_length)
        self.peak_flops = peak_flops(self.info.device, self.config.compute.precision)
        self.step = 0
        self.early_stopping = EarlyStopper(self.recipe.train.early_stopping)
        self.last_eval: dict[str, float] = {}
        self.last_eval_step: int | None = None
        self.stop_signal: str | None = None
        state = self._restore(resume) if resume is not None else {}
        if self.info.is_main:
            self._write_run_inputs(fresh=resume is None)
        overrides = " ".join(f"--set {text}" for text in {**self.config.overrides, **self.recipe.overrides}.values())
        if overrides:  # the values are in the params; the tag says which came from this start's command line
            tags = {**(tags or {}), "wmtp.overrides": overrides}
        self.tracker = Tracker(self.config.mlflow, run_dir.parent, run_name, active=self.info.is_main,
                               backends=self.config.tracking.backends, tags=tags,
                               resume_run_id=state.get("mlflow_run_id"), record_dir=run_dir, resumed_from=resume,
                               start_step=self.step)
        if resume is None:
            self.tracker.log_params({**flatten(self.config, "config"), **flatten(self.recipe, "recipe"),
                                     **flatten(setup.scheme_settings, "recipe"),
                                     **({"overrides": overrides} if overrides else {})})
            for path in config_files or ():
                self.tracker.log_artifact(path, "configs")

    def _write_run_inputs(self, *, fresh: bool) -> None:
        """The resolved config and recipe the run trains with (`wmtp eval` of its checkpoints reads them). A run
        that starts at step 0 writes them; a resumed run keeps the ones it started with, unless they are gone."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if fresh:  # a start at step 0 where an attempt left no checkpoint: its records are not this run's
            (self.run_dir / METRICS_FILE).unlink(missing_ok=True)
        for name, settings in ((RUN_CONFIG_FILE, self.config), (RUN_RECIPE_FILE, self.recipe)):
            path = self.run_dir / name
            if fresh or not path.is_file():
                with atomic_file(path) as tmp:
                    tmp.write_text(resolved_yaml(settings))

    # data ---------------------------------------------------------------------------------------------------
    def step_batches(self) -> list[StepBatch]:
        """This rank's micro-batches of the current optimizer step, with their per-head labels."""
        batches = []
        for k in range(self.plan.grad_accum_steps):
            rows = self.plan.micro_batch_rows(self.step * self.plan.grad_accum_steps + k, self.info.rank,
                                              len(self.setup.train_set))
            b = {name: v.to(self.info.device) for name, v in self.setup.train_set.select(rows).items()}
            labels = labels_for(b, self.model.n_heads, self.plan.mask_prompt)
            batches.append(StepBatch(b["input_ids"], b["attention_mask"], labels, rows, b["document_ids"]))
        return batches

    # one step -----------------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        started = time.monotonic()
        batches = self.scheme.step_batches(self.step, self.step_batches())  # or the scheme's own samples
        weights = self.scheme.step_weights(batches)
        normalizer = self.global_normalizer(batches, weights)
        totals = StepTotals.zeros(self.model.n_heads, self.info.device)
        self.model.train()
        for k, (batch, w) in enumerate(zip(batches, weights, strict=True)):
            out = self.forward_backward(k, batch, w, normalizer, sync=k == len(batches) - 1)
            totals.add(out, batch, out.weights if out.weights is not None else w)
        lr, grad_norm = self.optimizer_step()
        self.scheme.after_backward(self.recipe.optim.grad_clip)
        totals.all_reduce(self.info)
        elapsed = time.monotonic() - started
        return {**totals.metrics(), "train/lr": lr, "train/grad_norm": grad_norm,
                **self.throughput(float(totals.tokens), elapsed), **self.scheme.metrics()}

    def throughput(self, tokens: float, seconds: float) -> dict[str, float]:
        """Tokens/s over all ranks, the model FLOP/s they mean (flops_per_token × tokens/s) and, on a GPU of known
        peak, MFU = model FLOP/s / (peak × ranks). The time is the whole step, the scheme's own passes included
        (Rho-1's scoring, the critic's value pass); the FLOPs are the training model's forward and backward only,
        so MFU is the share of the peak that trains the model."""
        tokens_per_s = tokens / max(seconds, 1e-9)
        metrics = {"train/tokens_per_s": tokens_per_s, "train/model_tflops": self.flops_per_token * tokens_per_s / 1e12}
        if self.peak_flops is not None:
            metrics["train/mfu"] = self.flops_per_token * tokens_per_s / (self.peak_flops * self.info.world_size)
        return metrics

    def global_normalizer(self, batches: list[StepBatch], weights: list[torch.Tensor | None]) -> torch.Tensor:
        """The loss denominator of the whole step: all micro-batches, all ranks (docs/method.md §3)."""
        denominator = sum(loss_denominator(b.labels, w, head_coef=self.recipe.mtp.coefficients,
                                           reduction=self.recipe.loss.reduction)
                          for b, w in zip(batches, weights, strict=True))
        return dist_utils.all_reduce_sum(denominator.to(self.info.device), self.info)

    def forward_backward(self, index: int, batch: StepBatch, weights: torch.Tensor | None, normalizer: torch.Tensor,
                         *, sync: bool):
        """One micro-batch: the weighted loss (plus the scheme's auxiliary loss) and its backward. Both DDP and
        FSDP2 average gradients over ranks: the loss is scaled by the world size to sum them instead. With a trunk
        cache the heads read the micro-batch's cached trunk states (its rows) instead of running the trunk."""
        with parallelize.gradient_sync(self.wrapped, sync), self.autocast:
            out = self.wrapped(batch.input_ids, batch.attention_mask, MTPLoss(
                batch.labels, weights, self.scheme.weights_in_forward(index, batch),
                head_coef=self.recipe.mtp.coefficients, reduction=self.recipe.loss.reduction, normalizer=normalizer,
                allow_negative=self.scheme.allow_negative, chunk_size=self.plan.chunk_size),
                trunk=self.setup.trunk_states("train", batch.rows))
        aux = self.scheme.auxiliary_loss(index, batch, out)
        loss = out.loss if aux is None else out.loss + aux
        self.scaler.scale(loss * self.info.world_size).backward()
        return out

    def optimizer_step(self) -> tuple[float, float]:
        """Unscale, clip, step the optimizer and the schedule; returns (the step's lr, the gradient norm)."""
        self.scaler.unscale_(self.optimizer)
        grad_norm = self.clip_gradients()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lr, grad_norm

    def clip_gradients(self) -> float:
        """Clip the global gradient norm to `optim.grad_clip` (null: measure only); returns the norm before."""
        clip = self.recipe.optim.grad_clip
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip is not None else math.inf)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    # validation ---------------------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Uniform per-head CE, perplexity and top-1 accuracy and per-depth teacher-forced acceptance on the
        validation sequences (head_quality), plus the scheme's own validation metrics."""
        if self.setup.val_set is None:
            return {}
        report = head_quality(self.wrapped, self.setup.val_set, n_heads=self.model.n_heads,
                              batch_size=self.plan.micro_batch_size, mask_prompt=self.plan.mask_prompt,
                              chunk_size=self.plan.chunk_size, device=self.info.device, autocast=self.autocast,
                              max_batches=self.plan.eval_batches, info=self.info,
                              trunk_states=None if self.setup.trunk_cache is None else
                              lambda rows: self.setup.trunk_states("validation", rows))
        return {**quality_metrics(report), **self.scheme.evaluate()}

    def _log_evaluation(self) -> dict[str, float]:
        evaluation = self.evaluate()
        self.last_eval, self.last_eval_step = {**self.last_eval, **evaluation}, self.step
        self.tracker.log_metrics(evaluation, self.step)
        return evaluation

    def _initial_evaluation(self) -> None:
        """A fresh start's step-0 validation, logged as `<metric>_initial`."""
        if self.step == 0 and self.setup.val_set is not None:
            initial = self.evaluate()
            self.tracker.log_metrics({f"{k}_initial": v for k, v in initial.items()}, step=0)
            if "val/loss" in initial:
                self.last_eval = {**self.last_eval, "initial_val_loss": initial["val/loss"]}

    # checkpoints and signals --------------------------------------------------------------------------------
    def save(self) -> Path:
        scheme_tensors, scheme_state = self.scheme.state()
        state = {**self.early_stopping.state(), "last_eval": self.last_eval, "last_eval_step": self.last_eval_step,
                 "mlflow_run_id": self.tracker.run_id,
                 "micro_batches_done": self.step * self.plan.grad_accum_steps,
                 **({"scheme": scheme_state} if scheme_state else {})}
        return self.checkpointer.save(self.step, state, scheme_tensors, self.tracker.record_files())

    def _restore(self, resume: Path) -> dict:
        state = self.checkpointer.restore(resume)
        self.step = state["step"]
        self.early_stopping.load_state(state)
        self.last_eval = state.get("last_eval", {})
        self.last_eval_step = state.get("last_eval_step")
        if "scheme" in state:
            self.scheme.load_state(state["scheme_tensors"], state["scheme"])
        return state

    def hooks(self) -> RunHooks:
        """What a scheme's own stage before the first step may use of this run."""
        return RunHooks(self.run_dir, self.tracker.log_metrics, self.stop_requested)

    def stop_requested(self) -> bool:
        """Whether SIGTERM/SIGINT reached any rank (all-reduced, so every rank stops at the same step). An upload
        that failed on any rank stops every rank with its error."""
        flags = torch.tensor([1.0 if self.stop_signal else 0.0, 1.0 if self.checkpointer.upload_failed() else 0.0],
                             device=self.info.device)
        flags = dist_utils.all_reduce_sum(flags, self.info)
        if flags[1].item() > 0:
            self.checkpointer.raise_upload_failure()
        return bool(flags[0].item() > 0)

    @contextmanager
    def _signals(self) -> Iterator[None]:
        def on_signal(signum, _frame) -> None:
            self.stop_signal = signal.Signals(signum).name

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _stopped(self) -> str:
        return (f"stopped by {self.stop_signal or 'a signal on another rank'} after step {self.step}; "
                "--resume auto continues from its checkpoint")

    # the loop ------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train to the end of the plan, an early stop or a stop signal; returns the outcome. Status: FINISHED
        (completed or stopped early), STOPPED (SIGTERM/SIGINT: a checkpoint of the last step was saved; `--resume
        auto` continues), FAILED (an error, re-raised)."""
        progress = Progress(self.plan.total_steps, self.step, enabled=self.config.logging.progress,
                            active=self.info.is_main, every=self.config.logging.log_every)
        final = None
        try:
            with self._signals():
                self.scheme.before_training(self.hooks())
                if self.stop_requested():  # during a scheme's own first stage (critic stage 1)
                    status, reason = "STOPPED", self._stopped()
                else:
                    self._initial_evaluation()
                    status, reason = self._train(progress)
                if self.recipe.train.eval_every is None and self.setup.val_set is not None:
                    self._log_evaluation()  # the one validation, at the end
                checkpoint = self.save()
                self._write_artifacts()
                if status == "FINISHED":
                    final = self.checkpointer.save_final(self.tracker, self.scheme.finish)
                self.tracker.flush()  # the event files are among the files uploaded last
                self.checkpointer.finish_uploads()
        except BaseException:
            self.tracker.end("FAILED")
            raise
        finally:
            progress.close()
        self.tracker.set_tags({"wmtp.status": status, "wmtp.reason": reason, "wmtp.step": str(self.step)})
        self.tracker.end(status)
        self.checkpointer.upload_records()  # after end: the store's run.json has the final status
        return {"status": status, "reason": reason, "step": self.step, "total_steps": self.plan.total_steps,
                "checkpoint": str(checkpoint), "final_model": str(final) if final else None,
                "eval": self.last_eval, "eval_step": self.last_eval_step, "n_heads": self.model.n_heads,
                "mlflow_run_id": self.tracker.run_id, "tracking_uri": self.tracker.tracking_uri,
                "tensorboard_dir": str(self.tracker.tensorboard_dir) if self.tracker.tensorboard_dir else None}

    def _train(self, progress: Progress) -> tuple[str, str]:
        """Optimizer steps to the end of the plan, an early stop or a stop signal, with the validations and
        checkpoints between them; returns (status, reason)."""
        eval_every, save_every = self.recipe.train.eval_every, self.config.checkpoint.every_steps
        while self.step < self.plan.total_steps:
            metrics = self.train_step()
            self.step += 1
            last = self.step == self.plan.total_steps
            logged = self.step % self.config.logging.log_every == 0 or last
            if logged:
                self.tracker.log_metrics(metrics, self.step)
                self.tracker.log_histograms(self.scheme.histograms(), self.step)
            progress.update(self.step, metrics, logged)
            stop = False
            if eval_every is not None and (self.step % eval_every == 0 or last):
                evaluation = self._log_evaluation()
                progress.write(f"step {self.step}: " + ", ".join(f"{k}={v:.4f}" for k, v in evaluation.items()
                                                                  if "ppl" not in k))
                stop = self.early_stopping.should_stop(evaluation)
            if save_every is not None and self.step % save_every == 0 and not last:
                self.save()  # the last step's checkpoint is saved after the loop
            if self.stop_requested():
                return "STOPPED", self._stopped()
            if stop:
                return "FINISHED", self.early_stopping.reason()
        return "FINISHED", "completed"

    def _write_artifacts(self) -> None:
        if self.info.is_main:
            for name, text in self.scheme.artifacts().items():
                (self.run_dir / name).write_text(text)
                self.tracker.log_artifact(self.run_dir / name, "weights")
