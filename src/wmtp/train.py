"""The training loop: set-up from a config and a recipe, then optimizer steps that read top to bottom.

One optimizer step:
1. take this rank's slice of the step's `grad_accum_steps` global micro-batches (a fixed order per epoch);
2. build per-head labels, ask the weighting scheme for detached weights over the whole step;
3. sum the loss denominators of all micro-batches, all-reduce it over ranks (the global normaliser);
4. forward + backward each micro-batch on the fast path with that normaliser (gradient sync on the last);
5. clip, step the optimizer and the schedule; all-reduce and log the metrics.
Validation, early stopping, checkpoints and SIGTERM/SIGINT are handled between steps.
"""

from __future__ import annotations

import importlib.util
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from . import distributed as dist_utils
from .checkpoint import STATE_FILE, list_checkpoints, load_checkpoint, save_checkpoint, save_model
from .config import Config, ConfigError, ModelSource, Pretrain, Recipe, ReferenceSource, flatten
from .critic_math import TokenRewards, token_rewards
from .data import (
    SequenceSet,
    epoch_order,
    load_examples,
    recipe_sequences,
    train_bpe_tokenizer,
)
from .distributed import DistInfo
from .loss import IGNORE_INDEX, loss_denominator, mtp_labels
from .model import CONFIG_KEY, MTPModel, check_plain_unembedding, load_causal_lm
from .reference_cache import fingerprint, read_cache
from .rewards import make_reward
from .tracking import Progress, Tracker
from .weighting import Rho1Weighting, StepBatch, UniformWeighting, WeightingScheme
from .weighting.critic import CriticWeighting
from .weighting.rho1 import check_tokenizers_compatible, reference_target_ce, reference_target_ce_chunked

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------- set-up
def resolve_model_path(spec: str) -> str:
    """`pkg:<package>/<file>` → the file inside the installed package (found without importing it);
    anything else is returned unchanged (a hub id, a directory or a GGUF path)."""
    if not spec.startswith("pkg:"):
        return spec
    package, _, rel = spec[4:].partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ConfigError(f"model path {spec}: package `{package}` is not installed")
    path = Path(found.submodule_search_locations[0]) / rel
    if not path.exists():
        raise ConfigError(f"model path {spec}: {path} does not exist")
    return str(path)


def secret(value) -> str | None:
    """The text of an optional SecretStr; an empty one (e.g. an unset `${HF_TOKEN:-}`) is None."""
    return (value.get_secret_value() or None) if value is not None else None


def autocast_for(device: torch.device, precision: str):
    """The forward's autocast context for `compute.precision` (fp32: none)."""
    dtype = _AUTOCAST.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def load_tokenizer_from(spec: str, token: str | None = None):
    path = Path(resolve_model_path(spec))
    try:
        if path.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoTokenizer.from_pretrained(str(path), token=token)
    except OSError as exc:
        raise ConfigError(f"tokenizer {spec}: {str(exc).splitlines()[0]}") from exc


def check_tokenizer_fits(tokenizer, model: MTPModel, what: str) -> None:
    vocab = model.unembedding.weight.shape[0]
    if len(tokenizer) > vocab:
        raise ConfigError(f"{what}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {vocab}")


def build_model(source: ModelSource, recipe: Recipe, tokenizer) -> MTPModel:
    try:
        return _build_model(source, recipe, tokenizer)
    except OSError as exc:  # missing files, no network, unknown hub id: name what was asked for
        raise ConfigError(f"model.path {source.path}: {str(exc).splitlines()[0]}") from exc


def _build_model(source: ModelSource, recipe: Recipe, tokenizer) -> MTPModel:
    shape = recipe.mtp
    if source.from_scratch is not None:
        s = source.from_scratch
        base = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
            num_hidden_layers=s.num_layers, num_attention_heads=s.num_attention_heads,
            num_key_value_heads=s.num_key_value_heads, max_position_embeddings=s.max_position_embeddings,
            tie_word_embeddings=s.tie_word_embeddings, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
        return MTPModel.from_base(base.to(_DTYPES[source.dtype]), n_heads=shape.n_heads, head_type=shape.head_type)
    path = resolve_model_path(source.path)
    config_file = Path(path) / "config.json"
    dtype = _DTYPES[source.dtype]
    if config_file.is_file() and CONFIG_KEY in config_file.read_text():
        model = MTPModel.from_pretrained(path, dtype=dtype)
        if (model.n_heads, model.mtp_config.head_type) != (shape.n_heads, shape.head_type):
            raise ConfigError(f"{path}: a wmtp model with {model.n_heads} {model.mtp_config.head_type} heads, "
                              f"the recipe asks for {shape.n_heads} {shape.head_type} heads")
        return model
    token = secret(source.hf_token)
    base = load_causal_lm(path, dtype=dtype, token=token)
    return MTPModel.from_base(base, n_heads=shape.n_heads, head_type=shape.head_type)


@dataclass
class RunSetup:
    config: Config
    recipe: Recipe
    info: DistInfo
    tokenizer: object
    model: MTPModel
    train_set: SequenceSet
    val_set: SequenceSet | None
    n_train_examples: int
    n_val_examples: int
    reference: torch.nn.Module | None = None
    train_rewards: TokenRewards | None = None  # critic: per-token rewards of train_set / val_set
    val_rewards: TokenRewards | None = None


def load_reference(source: ReferenceSource | None, tokenizer, device: torch.device,
                   load_weights: bool = True) -> torch.nn.Module | None:
    """Rho-1's reference: frozen, in eval mode, in `dtype`, checked to share the trained model's tokenizer
    (only the check when its CEs come from the cache)."""
    if source is None:
        raise ConfigError("algorithm rho1 needs config `reference_model` with a `path` (hub id, directory or GGUF)")
    token = secret(source.hf_token)
    reference_tokenizer = load_tokenizer_from(source.tokenizer or source.path, token)
    try:
        check_tokenizers_compatible(tokenizer, reference_tokenizer)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not load_weights:
        return None
    try:
        model = load_causal_lm(resolve_model_path(source.path), dtype=_DTYPES[source.dtype], token=token)
    except OSError as exc:
        raise ConfigError(f"reference_model.path {source.path}: {str(exc).splitlines()[0]}") from exc
    model.requires_grad_(False)
    return model.eval().to(device)


def prepare(config: Config, recipe: Recipe, info: DistInfo, *, tokenizer_dir: Path | None = None,
            score_reference: bool = False) -> RunSetup:
    """Read the data, get the tokenizer (trained, loaded, or from a checkpoint), build the model and the sequences.
    Deterministic given the seed: every rank builds the same model and the same sequences."""
    if config.compute.threads is not None:
        torch.set_num_threads(config.compute.threads)
    if config.compute.precision == "fp16" and info.device.type != "cuda":
        raise ConfigError("compute.precision fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    torch.manual_seed(config.compute.seed)
    train_examples, val_examples = load_examples(recipe.data, config.datasets)
    source = config.model
    if tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    elif source.train_tokenizer is not None:
        texts = [ex.prompt + ex.completion for ex in train_examples]
        tokenizer = train_bpe_tokenizer(texts, source.train_tokenizer.vocab_size, source.train_tokenizer.min_frequency)
    else:
        token = secret(source.hf_token)
        tokenizer = load_tokenizer_from(source.tokenizer or source.path, token)
    torch.manual_seed(config.compute.seed)
    model = build_model(source, recipe, tokenizer).to(info.device)
    check_tokenizer_fits(tokenizer, model, "model")
    train_set = recipe_sequences(train_examples, tokenizer, recipe.data, recipe.data.shuffle_seed)
    val_set = recipe_sequences(val_examples, tokenizer, recipe.data, 0) if val_examples else None
    train_rewards = val_rewards = None
    if recipe.algorithm == "critic":
        if config.compute.precision == "fp16":
            raise ConfigError("algorithm critic supports compute.precision fp32 and bf16 (the value head has its "
                              "own optimizer outside the fp16 gradient scaler)")
        score = make_reward(recipe.critic.reward, device=info.device)
        train_rewards = token_rewards(train_set, torch.tensor(score(train_examples))[train_set.doc_examples])
        if val_set is not None:
            val_rewards = token_rewards(val_set, torch.tensor(score(val_examples))[val_set.doc_examples])
    reference = None
    if recipe.algorithm == "rho1":
        cached = config.reference_cache is not None and not score_reference
        reference = load_reference(config.reference_model, tokenizer, info.device, load_weights=not cached)
    return RunSetup(config, recipe, info, tokenizer, model, train_set, val_set, len(train_examples),
                    len(val_examples), reference, train_rewards, val_rewards)


def step_counts(n_sequences: int, t, world_size: int) -> tuple[int, int]:
    """(total optimizer steps, steps per epoch); an incomplete last step of an epoch is dropped."""
    per_step = t.micro_batch_size * world_size * t.grad_accum_steps
    per_epoch = n_sequences // per_step
    if per_epoch == 0:
        raise ConfigError(f"data: {n_sequences} training sequences, fewer than one optimizer step needs ({per_step}); "
                          "lower micro_batch_size or grad_accum_steps, or add data")
    candidates = [t.max_steps] if t.max_steps is not None else []
    if t.num_epochs is not None:
        candidates.append(max(1, math.ceil(t.num_epochs * per_epoch)))
    return min(candidates), per_epoch


def validation_metric_names(n_heads: int) -> list[str]:
    """The metrics `Trainer.evaluate` reports (the names early stopping may monitor)."""
    return ["val/loss"] + [f"val/{kind}_head{h}" for h in range(n_heads) for kind in ("ce", "ppl", "acc")]


def labels_for(batch: dict[str, torch.Tensor], n_heads: int, mask_prompt: bool) -> torch.Tensor:
    """Per-head labels of a batch of sequences (prompt tokens excluded as targets when mask_prompt)."""
    return mtp_labels(batch["input_ids"], n_heads, attention_mask=batch["attention_mask"],
                      document_ids=batch["document_ids"], prompt_mask=batch["prompt_mask"] if mask_prompt else None)


def per_head_sums(ce: torch.Tensor, correct: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[3n] float64: per-head CE sum, correct count and valid-pair count of a batch (ce, correct, labels: [B, S, n])."""
    valid = labels != IGNORE_INDEX
    return torch.cat([ce.sum(dim=(0, 1)), correct.sum(dim=(0, 1)), valid.sum(dim=(0, 1))]).double()


def make_scheme(setup: RunSetup, model: torch.nn.Module, autocast) -> WeightingScheme:
    """The recipe's weighting scheme; `model` is the (possibly wrapped) model the trainer steps."""
    recipe = setup.recipe
    if recipe.algorithm == "baseline-mtp":
        return UniformWeighting()
    if recipe.algorithm == "critic":
        total_steps, _ = step_counts(len(setup.train_set), recipe.train, setup.info.world_size)
        return CriticWeighting(recipe.critic, recipe.pretrain or Pretrain(), recipe, setup.model, model, autocast,
                               setup.info, setup.train_rewards, setup.val_rewards,
                               setup.model.config.hidden_size, total_steps, lr_lambda)

    @torch.no_grad()
    def model_ce(batch: StepBatch) -> torch.Tensor:
        with autocast:
            return model(batch.input_ids, batch.attention_mask, labels=batch.labels,
                         chunk_size=recipe.loss.chunk_size).ce

    if setup.config.reference_cache is not None:
        key = fingerprint(setup.train_set, setup.tokenizer, resolve_model_path(setup.config.reference_model.path))
        cache = read_cache(Path(setup.config.reference_cache), key)

        def reference_ce(batch: StepBatch) -> torch.Tensor:
            return cache[batch.rows].to(batch.input_ids.device)
    else:
        def reference_ce(batch: StepBatch) -> torch.Tensor:
            return score_reference_batch(setup.reference, batch.input_ids, batch.attention_mask, autocast,
                                         recipe.loss.chunk_size)

    return Rho1Weighting(recipe.rho1, model_ce, reference_ce, setup.info)


@torch.no_grad()
def score_reference_batch(reference: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          autocast, chunk_size: int = 256) -> torch.Tensor:
    """The reference's CE of every target token of a batch: [B, S] (see `reference_target_ce`). With a plain
    unembedding the logits are computed `chunk_size` positions at a time, never [B, S, V] at once; a reference
    that transforms its logits (soft-capping, scaling) goes through its own full forward."""
    try:
        check_plain_unembedding(reference.config)
    except ValueError:
        with autocast:
            logits = reference(input_ids=input_ids, attention_mask=attention_mask).logits
        return reference_target_ce(logits, input_ids, attention_mask)
    with autocast:
        hidden = reference.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return reference_target_ce_chunked(hidden, reference.get_output_embeddings(), input_ids, attention_mask,
                                           chunk_size)


def score_reference_set(setup: RunSetup, batch_size: int, autocast) -> torch.Tensor:
    """Reference CEs of every training sequence, [N, S] fp32 on the CPU."""
    train = setup.train_set
    out = torch.zeros(train.input_ids.shape, dtype=torch.float32)
    for start in range(0, len(train), batch_size):
        index = torch.arange(start, min(start + batch_size, len(train)))
        batch = {k: v.to(setup.info.device) for k, v in train.select(index).items()}
        out[index] = score_reference_batch(setup.reference, batch["input_ids"], batch["attention_mask"],
                                           autocast, setup.recipe.loss.chunk_size).cpu()
    return out


def lr_lambda(schedule, total_steps: int):
    def factor(step: int) -> float:
        if step < schedule.warmup_steps:
            return (step + 1) / schedule.warmup_steps
        if schedule.kind == "constant":
            return 1.0
        progress = min(1.0, (step - schedule.warmup_steps) / max(1, total_steps - schedule.warmup_steps))
        if schedule.kind == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return schedule.min_lr_ratio + (1.0 - schedule.min_lr_ratio) * shape

    return factor


def make_optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    o = recipe.optim
    return torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=o.lr, betas=o.betas, eps=o.eps)


# ----------------------------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, setup: RunSetup, run_dir: Path, *, run_name: str, tags: dict[str, str] | None = None,
                 resume: Path | None = None, config_files: tuple[Path, Path] | None = None) -> None:
        self.s = setup
        self.info = setup.info
        self.recipe = setup.recipe
        self.config = setup.config
        self.run_dir = run_dir
        t = self.recipe.train
        self.micro_per_step = t.grad_accum_steps
        self.global_micro = t.micro_batch_size * self.info.world_size
        self.total_steps, self.steps_per_epoch = step_counts(len(setup.train_set), t, self.info.world_size)
        if t.early_stopping is not None and setup.val_set is None:
            raise ConfigError("recipe train.early_stopping needs validation data (validation_fraction > 0 or "
                              "`validation` sources)")
        if t.early_stopping is not None:  # refuse a misspelt metric before training, not at the first evaluation
            known = validation_metric_names(setup.model.n_heads)
            if t.early_stopping.metric not in known:
                raise ConfigError(f"recipe train.early_stopping.metric: `{t.early_stopping.metric}` is not a "
                                  f"validation metric (available: {', '.join(known)})")
        self.model = setup.model
        # FSDP2 replaces the parameters with sharded ones: wrap first, then build the optimizer over them.
        self.wrapped = dist_utils.wrap_model(self.model, self.info, self.config.compute.distributed)
        self.optimizer = make_optimizer(self.model, self.recipe)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.recipe.schedule,
                                                                                     self.total_steps))
        self.step = 0
        self.best: float | None = None
        self.bad_evals = 0
        self.last_eval: dict[str, float] = {}
        resume_run_id = None
        if resume is not None:
            state = load_checkpoint(resume, self.model, self.optimizer, self.scheduler)
            self.step = state["step"]
            self.best, self.bad_evals = state["best"], state["bad_evals"]
            self.last_eval = state.get("last_eval", {})
            resume_run_id = state.get("mlflow_run_id")
        self.tracker = Tracker(self.config.mlflow, Path(self.config.output_dir), run_name, active=self.info.is_main,
                               tags=tags, resume_run_id=resume_run_id)
        if resume is None:
            self.tracker.log_params({**flatten(self.config, "config"), **flatten(self.recipe, "recipe")})
            if config_files is not None:
                for path in config_files:
                    self.tracker.log_artifact(path, "configs")
        self.stop_signal: str | None = None
        self.autocast = autocast_for(self.info.device, self.config.compute.precision)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.config.compute.precision == "fp16")
        self.scheme = make_scheme(setup, self.wrapped, self.autocast)
        if resume is not None and "scheme" in state:
            self.scheme.load_state(state["scheme_tensors"], state["scheme"])

    # data ---------------------------------------------------------------------------------------------------
    def micro_batch(self, global_index: int) -> dict[str, torch.Tensor]:
        """This rank's slice of global micro-batch `global_index` of the training order."""
        dataset = self.s.train_set
        per_epoch = self.steps_per_epoch * self.micro_per_step
        epoch, within = divmod(global_index, per_epoch)
        order = epoch_order(len(dataset), self.recipe.data.shuffle_seed, epoch)
        start = within * self.global_micro + self.info.rank * self.recipe.train.micro_batch_size
        index = order[start:start + self.recipe.train.micro_batch_size]
        return {"rows": index, **{k: v.to(self.info.device) for k, v in dataset.select(index).items()}}

    def labels_for(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return labels_for(batch, self.model.n_heads, self.recipe.data.mask_prompt)

    # one step -----------------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        n = self.model.n_heads
        coef = self.recipe.mtp.head_coef
        reduction = self.recipe.loss.reduction
        batches = [self.micro_batch(self.step * self.micro_per_step + k) for k in range(self.micro_per_step)]
        steps = [StepBatch(b["input_ids"], b["attention_mask"], self.labels_for(b), b["rows"], b["document_ids"])
                 for b in batches]
        weights = self.scheme.step_weights(steps)
        denominator = sum(loss_denominator(sb.labels, w, head_coef=coef, reduction=reduction)
                          for sb, w in zip(steps, weights, strict=True))
        denominator = dist_utils.all_reduce_sum(denominator.to(self.info.device), self.info)
        sums = torch.zeros(3 * n + 6, dtype=torch.float64, device=self.info.device)
        w_min, w_max = math.inf, -math.inf
        started = time.monotonic()
        self.model.train()
        for k, (sb, w) in enumerate(zip(steps, weights, strict=True)):
            with dist_utils.gradient_sync(self.wrapped, k == len(steps) - 1), self.autocast:
                out = self.wrapped(sb.input_ids, sb.attention_mask, labels=sb.labels, weights=w, head_coef=coef,
                                   reduction=reduction, normalizer=denominator, chunk_size=self.recipe.loss.chunk_size,
                                   allow_negative=self.scheme.allow_negative)
            aux = self.scheme.auxiliary_loss(k, sb, out)
            loss = out.loss if aux is None else out.loss + aux
            self.scaler.scale(loss * self.info.world_size).backward()
            valid = sb.labels != IGNORE_INDEX
            wv = torch.ones_like(sb.labels, dtype=torch.float32)[valid] if w is None else w[valid].float()
            sums[:3 * n] += per_head_sums(out.ce, out.correct, sb.labels)
            sums[3 * n:] += torch.stack([out.loss.detach().double(), wv.sum().double(), wv.double().pow(2).sum(),
                                         (wv == 0).sum().double(), sb.attention_mask.sum().double(),
                                         valid.sum().double()])
            if wv.numel():
                w_min, w_max = min(w_min, float(wv.min())), max(w_max, float(wv.max()))
        self.scaler.unscale_(self.optimizer)
        grad_norm = self._clip_gradients()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheme.after_backward(self.recipe.optim.grad_clip)
        dist_utils.all_reduce_sum(sums, self.info)
        extremes = torch.tensor([-w_min, w_max], dtype=torch.float64, device=self.info.device)
        if self.info.distributed:
            torch.distributed.all_reduce(extremes, op=torch.distributed.ReduceOp.MAX)
        elapsed = time.monotonic() - started
        ce, correct, count = sums[:n], sums[n:2 * n], sums[2 * n:3 * n].clamp_min(1)
        loss, w_sum, w_sq, w_zero, tokens, pairs = sums[3 * n:].tolist()
        pairs = max(pairs, 1.0)
        w_mean = w_sum / pairs
        metrics = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                   "train/tokens_per_s": tokens / max(elapsed, 1e-9),
                   "weights/mean": w_mean, "weights/std": math.sqrt(max(w_sq / pairs - w_mean**2, 0.0)),
                   "weights/min": -float(extremes[0]), "weights/max": float(extremes[1]),
                   "weights/frac_zero": w_zero / pairs}
        for h in range(n):
            metrics[f"train/ce_head{h}"] = float(ce[h] / count[h])
            metrics[f"train/acc_head{h}"] = float(correct[h] / count[h])
        metrics.update(self.scheme.metrics())
        return metrics

    def _clip_gradients(self) -> float:
        clip = self.recipe.optim.grad_clip
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip is not None else math.inf)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    # validation ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Uniform per-head CE, perplexity and top-1 accuracy over the validation sequences (λ and weights do
        not enter: runs with different schemes are compared on the same quantity). val/loss is the mean CE
        over all valid (token, head) pairs."""
        val = self.s.val_set
        if val is None:
            return {}
        n = self.model.n_heads
        mb = self.recipe.train.micro_batch_size
        n_batches = math.ceil(len(val) / mb)
        if self.recipe.train.eval_batches is not None:
            n_batches = min(n_batches, self.recipe.train.eval_batches)
        per_rank = math.ceil(n_batches / self.info.world_size)
        sums = torch.zeros(3 * n, dtype=torch.float64, device=self.info.device)
        self.model.eval()
        for i in range(per_rank):
            b = i * self.info.world_size + self.info.rank
            first = b * mb if b < n_batches else 0
            index = torch.arange(first, min(first + mb, len(val)))
            batch = {k: v.to(self.info.device) for k, v in val.select(index).items()}
            labels = self.labels_for(batch)
            if b >= n_batches:  # keeps every rank's forward count equal (FSDP2 collectives); contributes nothing
                labels = torch.full_like(labels, IGNORE_INDEX)
            with self.autocast:
                out = self.wrapped(batch["input_ids"], batch["attention_mask"], labels=labels,
                                   chunk_size=self.recipe.loss.chunk_size)
            sums += per_head_sums(out.ce, out.correct, labels)
        dist_utils.all_reduce_sum(sums, self.info)
        ce, correct, count = sums[:n], sums[n:2 * n], sums[2 * n:].clamp_min(1)
        metrics = {"val/loss": float(ce.sum() / count.sum())}
        for h in range(n):
            metrics[f"val/ce_head{h}"] = float(ce[h] / count[h])
            metrics[f"val/ppl_head{h}"] = math.exp(min(float(ce[h] / count[h]), 50.0))
            metrics[f"val/acc_head{h}"] = float(correct[h] / count[h])
        metrics.update(self.scheme.evaluate(val, mb, self.recipe.train.eval_batches))
        return metrics

    def _early_stop(self, metrics: dict[str, float]) -> bool:
        rule = self.recipe.train.early_stopping
        if rule is None:
            return False
        value = metrics[rule.metric]
        improved = (self.best is None or (value < self.best - rule.min_delta if rule.mode == "min"
                                          else value > self.best + rule.min_delta))
        if improved:
            self.best, self.bad_evals = value, 0
        else:
            self.bad_evals += 1
        return self.bad_evals >= rule.patience

    # checkpoints and signals --------------------------------------------------------------------------------
    def save(self) -> Path | None:
        scheme_tensors, scheme_state = self.scheme.state()
        state = {"best": self.best, "bad_evals": self.bad_evals, "last_eval": self.last_eval,
                 "mlflow_run_id": self.tracker.run_id, "micro_batches_done": self.step * self.micro_per_step,
                 **({"scheme": scheme_state} if scheme_state else {})}
        return save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self.scheduler, state,
                               self.s.tokenizer, self.info, self.config.checkpoint.keep_last, scheme_tensors)

    def _on_signal(self, signum, _frame) -> None:
        self.stop_signal = signal.Signals(signum).name

    def _stop_requested(self) -> bool:
        flag = torch.tensor([1.0 if self.stop_signal else 0.0], device=self.info.device)
        return bool(dist_utils.all_reduce_sum(flag, self.info).item() > 0)

    # the loop ------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        t = self.recipe.train
        progress = Progress(self.total_steps, self.step, enabled=self.config.logging.progress,
                            active=self.info.is_main)
        status, reason = "FINISHED", "completed"
        checkpoint = None
        try:
            self.scheme.before_training(self)
            if self._stop_requested():  # during a scheme's own first stage (critic stage 1)
                status, reason = "KILLED", f"stopped by {self.stop_signal or 'a signal on another rank'}"
            if status == "FINISHED" and self.step == 0 and self.s.val_set is not None:
                initial = self.evaluate()
                self.tracker.log_metrics({f"{k}_initial": v for k, v in initial.items()}, step=0)
                self.last_eval = {**self.last_eval, "initial_val_loss": initial["val/loss"]}
            while status == "FINISHED" and self.step < self.total_steps:
                metrics = self.train_step()
                self.step += 1
                logged = self.step % self.config.logging.log_every == 0 or self.step == self.total_steps
                if logged:
                    self.tracker.log_metrics(metrics, self.step)
                progress.update(self.step, metrics, logged)
                stop = False
                if t.eval_every is not None and (self.step % t.eval_every == 0 or self.step == self.total_steps):
                    evaluation = self.evaluate()
                    self.last_eval = {**self.last_eval, **evaluation}
                    self.tracker.log_metrics(evaluation, self.step)
                    progress.write(f"step {self.step}: " + ", ".join(
                        f"{k}={v:.4f}" for k, v in evaluation.items() if "ppl" not in k))
                    stop = self._early_stop(evaluation)
                    if stop:
                        reason = (f"early stopping: {t.early_stopping.metric} did not improve for "
                                  f"{t.early_stopping.patience} evaluations")
                every = self.config.checkpoint.every_steps
                if every is not None and self.step % every == 0 and self.step < self.total_steps:
                    checkpoint = self.save() or checkpoint
                if self._stop_requested():
                    status, reason = "KILLED", f"stopped by {self.stop_signal or 'a signal on another rank'}"
                    break
                if stop:
                    break
            if t.eval_every is None and self.s.val_set is not None:
                evaluation = self.evaluate()
                self.last_eval = {**self.last_eval, **evaluation}
                self.tracker.log_metrics(evaluation, self.step)
            checkpoint = self.save() or checkpoint
            if self.info.is_main:
                for name, text in self.scheme.artifacts().items():
                    (self.run_dir / name).write_text(text)
                    self.tracker.log_artifact(self.run_dir / name, "weights")
            final = None
            if status == "FINISHED":
                final = save_model(self.model, self.run_dir / "final", self.s.tokenizer, self.info)
                if final is not None:
                    self.scheme.finish(final)
                if final is not None and self.config.mlflow.log_model:
                    self.tracker.log_artifact(final, "model")
        except BaseException:
            self.tracker.end("FAILED")
            raise
        finally:
            progress.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self.tracker.end(status)
        return {"status": status, "reason": reason, "step": self.step, "total_steps": self.total_steps,
                "checkpoint": str(checkpoint) if checkpoint else None, "final_model": str(final) if final else None,
                "eval": self.last_eval, "mlflow_run_id": self.tracker.run_id, "tracking_uri": self.tracker.tracking_uri}


def find_resume(resume: str | None, run_dir: Path) -> Path | None:
    """`auto` → the run directory's latest checkpoint (None when there is none); a path → that checkpoint."""
    if resume is None:
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"--resume {resume}: not a checkpoint directory (no {STATE_FILE})")
    return path
