"""Set-up of a run from a config and a recipe: tokenizer, data, model, the step plan, the distributed wrapping and
the weighting scheme. Every check of a config or recipe value against the run happens here, so `--dry-run`
(which stops after set-up) reports all of them; the trainer only trains.

Deterministic given the seed: every rank builds the same model and the same sequences.
"""

from __future__ import annotations

import sys
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel
from transformers import AutoTokenizer

from ..components.validate import head_quality, quality_metric_names
from ..config import Config, ConfigError, Recipe, check_heads_fit
from ..data.sequences import SequenceSet, labels_for, recipe_sequences, train_bpe_tokenizer
from ..data.sources import Example, load_examples
from ..data.steps import StepPlan, plan_steps
from ..loss import IGNORE_INDEX
from ..model import parallelize
from ..model.build import build_model, check_tokenizer_fits, load_tokenizer_from, secret
from ..model.memory import meta_model
from ..model.mtp import MTPModel, TrunkStates, scale_fresh_depths
from ..model.trunk_cache import TrunkStateCache
from ..runtime.distributed import DistInfo
from ..runtime.precision import DTYPES, autocast_for, dtype_or_none
from ..runtime.storage import is_remote
from ..runtime.tracking import check_backends, quiet_library_progress
from ..weighting import checked_config, plugin, scheme_settings
from ..weighting.base import SchemeContext, WeightingScheme
from .trunk_cache import check_trunk_cache, open_trunk_cache


@dataclass
class RunData:
    """The tokenizer and the training and validation data of a recipe (no model)."""

    tokenizer: object
    train_examples: list[Example]
    val_examples: list[Example]
    train_set: SequenceSet
    val_set: SequenceSet | None


@dataclass
class RunSetup:
    config: Config
    recipe: Recipe
    info: DistInfo
    data: RunData
    model: MTPModel
    wrapped: torch.nn.Module  # what the trainer steps: DDP/FSDP2 around `model`, or `model` itself
    autocast: AbstractContextManager
    plan: StepPlan
    scheme_settings: BaseModel  # the recipe sections the scheme owns, validated by it
    scheme: WeightingScheme
    trunk_cache: TrunkStateCache | None = None  # the frozen trunk's states, read instead of running it

    def trunk_states(self, split: str, rows: torch.Tensor) -> TrunkStates | None:
        """The cached trunk states of `rows` of `split` (train or validation) on the run's device; None without a
        cache (the forward then runs the trunk)."""
        return None if self.trunk_cache is None else self.trunk_cache.states(split, rows, self.info.device)

    @property
    def tokenizer(self):
        return self.data.tokenizer

    @property
    def train_set(self) -> SequenceSet:
        return self.data.train_set

    @property
    def val_set(self) -> SequenceSet | None:
        return self.data.val_set


def load_run_data(config: Config, recipe: Recipe, *, tokenizer_dir: Path | None = None) -> RunData:
    """Read the data and get the tokenizer (from a checkpoint, trained on the training texts, or the model's)."""
    train_examples, val_examples = load_examples(recipe.data, config.datasets)
    source = config.model
    if tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    elif source.train_tokenizer is not None:
        texts = [ex.prompt + ex.completion for ex in train_examples]
        tokenizer = train_bpe_tokenizer(texts, source.train_tokenizer.vocab_size, source.train_tokenizer.min_frequency)
    else:
        tokenizer = load_tokenizer_from(source.tokenizer or source.path, secret(source.hf_token),
                                        "model.tokenizer" if source.tokenizer else "model.path")
    train_set = recipe_sequences(train_examples, tokenizer, recipe.data, recipe.data.shuffle_seed)
    val_set = recipe_sequences(val_examples, tokenizer, recipe.data, 0) if val_examples else None
    return RunData(tokenizer, train_examples, val_examples, train_set, val_set)


def check_run_settings(config: Config, recipe: Recipe, info: DistInfo, data: RunData, n_heads: int) -> None:
    """The checks of config and recipe values that need the data or the device."""
    check_heads_fit(recipe)  # again for a recipe built in code
    check_backends(config)
    missing = heads_without_targets(data.train_set, n_heads, recipe.data.mask_prompt)
    if missing:
        raise ConfigError(f"{recipe.source}: mtp.n_heads: heads {', '.join(map(str, missing))} have no target in the "
                          f"training sequences (data.max_length {recipe.data.max_length}"
                          f"{', packing off' if not recipe.data.packing else ''}"
                          f"{', prompts masked' if recipe.data.mask_prompt else ''}): every document is shorter than "
                          "the distance they predict; use fewer heads or longer sequences")
    if config.compute.precision == "fp16" and info.device.type != "cuda":
        raise ConfigError("compute.precision fp16 needs a CUDA device (use bf16 or fp32 on CPU or MPS)")
    output = Path(config.output_dir)
    if not is_remote(config.output_dir) and output.exists() and not output.is_dir():
        raise ConfigError(f"{config.source}: output_dir: {output} is a file, expected a directory")
    rule = recipe.train.early_stopping
    if rule is not None and data.val_set is None:
        raise ConfigError("recipe train.early_stopping needs validation data (validation_fraction > 0 or "
                          "`validation` sources)")
    if rule is not None and rule.metric not in quality_metric_names(n_heads):
        raise ConfigError(f"recipe train.early_stopping.metric: `{rule.metric}` is not a validation metric "
                          f"(available: {', '.join(quality_metric_names(n_heads))})")


def heads_without_targets(sequences: SequenceSet, n_heads: int, mask_prompt: bool, rows: int = 256) -> list[int]:
    """The heads with no valid (position, head) pair in `sequences`; reads `rows` sequences at a time and stops as
    soon as every head has one (the first block, unless documents are short)."""
    missing = torch.ones(n_heads, dtype=torch.bool)
    for first in range(0, len(sequences), rows):
        batch = sequences.select(torch.arange(first, min(first + rows, len(sequences))))
        missing &= ~(labels_for(batch, n_heads, mask_prompt) != IGNORE_INDEX).any(dim=(0, 1))
        if not missing.any():
            return []
    return missing.nonzero().flatten().tolist()


def prepare(config: Config, recipe: Recipe, info: DistInfo, *, tokenizer_dir: Path | None = None) -> RunSetup:
    """Everything a run needs before its first step; raises ConfigError on the first bad value."""
    if config.compute.threads is not None:
        torch.set_num_threads(config.compute.threads)
    if not config.logging.progress or not sys.stderr.isatty():  # a log file gets no carriage-return bars
        quiet_library_progress()
    config = checked_config(config)  # the config's scheme-owned keys (a config built in code is checked here)
    settings = scheme_settings(recipe)
    if config.trunk_cache is not None:  # before any data or model is built
        check_trunk_cache(config, recipe, config.compute.distributed, info.world_size, config.trunk_cache)
    torch.manual_seed(config.compute.seed)
    data = load_run_data(config, recipe, tokenizer_dir=tokenizer_dir)
    check_run_settings(config, recipe, info, data, recipe.mtp.n_heads)
    plan = plan_steps(len(data.train_set), recipe.train, recipe.data, recipe.loss.chunk_size, info.world_size)
    torch.manual_seed(config.compute.seed)
    # the rows `scale_fresh_depths` measures: the same on every rank and at every world size, and few (under FSDP2
    # rank 0 runs them through the whole model on its CPU)
    rows = data.train_set.select(torch.arange(min(2, len(data.train_set))))
    sample = {key: rows[key][:, :256] for key in ("input_ids", "attention_mask")}
    model, wrapped = build_and_wrap(config, recipe, info, data.tokenizer, sample)
    autocast = autocast_for(info.device, config.compute.precision)
    trunk_cache = open_trunk_cache(config, recipe, info, model, data)
    context = SchemeContext(model=model, wrapped=wrapped, autocast=autocast, info=info, plan=plan,
                            train_set=data.train_set, val_set=data.val_set, train_examples=data.train_examples,
                            val_examples=data.val_examples, tokenizer=data.tokenizer, config=config,
                            recipe=recipe, trunk_cache=trunk_cache)
    scheme = plugin(recipe.algorithm).build(settings, context)
    return RunSetup(config, recipe, info, data, model, wrapped, autocast, plan, settings, scheme, trunk_cache)


def build_and_wrap(config: Config, recipe: Recipe, info: DistInfo, tokenizer,
                   sample: dict[str, torch.Tensor]) -> tuple[MTPModel, torch.nn.Module]:
    """The model and the form the trainer steps. One process or DDP: every rank builds the model. FSDP2 under
    torchrun: every rank builds it on the meta device and shards it there; rank 0 alone loads (or initialises)
    the weights, on its CPU, and each rank receives only its shards, then the buffers (`parallelize.load_from_rank0`).
    Either way the weights are those of a plain load (tested). Fresh sequential depths are scaled to the trunk's
    residual stream on `sample`, the first training rows (`scale_fresh_depths`; a resumed run restores its own)."""
    compute, fsdp = config.compute, config.compute.fsdp
    sharded = info.distributed and compute.distributed == "fsdp2"
    if sharded:
        model = meta_model(config.model, recipe.mtp, len(tokenizer)).to(DTYPES[config.model.dtype])
    else:
        model = build_model(config.model, recipe.mtp, tokenizer).to(info.device)
        scale_fresh_depths(model, sample["input_ids"].to(info.device), sample["attention_mask"].to(info.device))
    check_tokenizer_fits(tokenizer, model, "model")
    parallelize.apply_activation_checkpointing(model, compute.checkpoint_every)
    # FSDP2 replaces the parameters with sharded ones: wrap before anything (scheme, optimizer) holds them.
    wrapped = parallelize.wrap_model(model, info, compute.distributed,
                                    param_dtype=dtype_or_none(fsdp.param_dtype),
                                    reduce_dtype=dtype_or_none(fsdp.reduce_dtype),
                                    cpu_offload=fsdp.cpu_offload)
    if sharded:
        full = build_model(config.model, recipe.mtp, tokenizer) if info.is_main else None
        if full is not None:
            scale_fresh_depths(full, sample["input_ids"], sample["attention_mask"])
        parallelize.load_from_rank0(model, full, info, cpu_offload=fsdp.cpu_offload)
        if full is not None:  # what rank 0 writes with the final model: the loaded configs, not the meta ones
            model.base.config, model.base.generation_config = full.base.config, full.base.generation_config
    return model, wrapped


def dry_run_report(setup: RunSetup) -> dict:
    """Head quality of the untrained model on one training micro-batch: the forward works end to end."""
    return head_quality(setup.wrapped, setup.train_set, n_heads=setup.model.n_heads,
                        batch_size=setup.plan.micro_batch_size, mask_prompt=setup.plan.mask_prompt,
                        chunk_size=setup.plan.chunk_size, device=setup.info.device, autocast=setup.autocast,
                        max_batches=1)


def describe_run(setup: RunSetup, run_dir: Path | str, tracking: str, report: dict | None = None) -> str:
    """What a run prints before its first step (and `--dry-run` with the `report` of one forward): the model, the
    data, the steps, the device and where outputs go."""
    model, recipe, info, plan = setup.model, setup.recipe, setup.info, setup.plan
    total = sum(p.numel() for p in model.parameters())
    heads = sum(p.numel() for p in model.heads.parameters())
    tokens = plan.sequences_per_step * recipe.data.max_length
    lines = [
        f"model: {total / 1e6:.2f}M parameters ({heads / 1e6:.2f}M in {model.n_heads - 1} extra "
        f"{model.mtp_config.head_type} heads), {model.n_heads} heads, vocabulary {model.unembedding.weight.shape[0]}",
        f"data: {len(setup.data.train_examples)} train / {len(setup.data.val_examples)} validation examples -> "
        f"{len(setup.train_set)} train / {len(setup.val_set) if setup.val_set else 0} validation sequences "
        f"of {recipe.data.max_length} tokens",
        f"steps: {plan.total_steps} optimizer steps ({plan.steps_per_epoch} per epoch), {tokens} tokens per step "
        f"({plan.micro_batch_size} x {plan.grad_accum_steps} accumulation x {info.world_size} processes)",
        f"weighting: {recipe.algorithm} ({type(setup.scheme).__name__})",
        f"device: {info.device}, precision {setup.config.compute.precision}, world size {info.world_size}",
        f"outputs: {run_dir} (checkpoints/, final/); tracking: {tracking}",
    ]
    overrides = {**setup.config.overrides, **recipe.overrides}
    if overrides:
        lines.insert(0, "overrides: " + " ".join(f"--set {text}" for text in overrides.values()))
    if report is not None:
        head_ce = " ".join(f"{h['ce']:.3f}" if h["ce"] is not None else "-" for h in report["heads"])
        lines.insert(-1, f"one forward on one batch: loss {report['loss']:.4f}; CE per head {head_ce}")
    return "\n".join(lines)
