"""Configuration: a *config* says where and how (model and data paths, outputs, tracking, devices), a *recipe*
says what (algorithm, MTP shape, data sources and sizes, loss, optimiser, training length, evaluation).

Both are YAML files validated by pydantic; unknown keys are errors at every level. String values may use
`${VAR}` (the variable must be set) and `${VAR:-default}`. Secrets (`SecretStr` fields) are never printed
or logged as parameters.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration problem a user can fix; its message is one line naming the file and the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------------- config
class ScratchModel(Strict):
    """A Llama-family model initialised from random weights (the demo; tests)."""

    hidden_size: int = Field(256, gt=0, description="width of the residual stream")
    num_layers: int = Field(4, ge=1, description="decoder layers of the base model; the last one is head 0")
    num_attention_heads: int = Field(4, ge=1, description="attention heads per layer (must divide hidden_size)")
    num_key_value_heads: int = Field(2, ge=1, description="key/value heads (grouped-query attention; divides "
                                     "num_attention_heads)")
    intermediate_size: int = Field(688, gt=0, description="width of the SwiGLU feed-forward layer")
    max_position_embeddings: int = Field(2048, gt=0, description="longest sequence the rotary positions cover")
    tie_word_embeddings: bool = Field(True, description="share the embedding matrix with the unembedding")


class TokenizerTraining(Strict):
    """A byte-level BPE tokenizer trained on the training texts before the model is built."""

    vocab_size: int = Field(4096, ge=300, description="tokens of the trained vocabulary (the 256 bytes included)")
    min_frequency: int = Field(2, ge=1, description="a merge is learnt only from pairs seen this often")


class ModelSource(Strict):
    """Where a model comes from: `path` (hub id, local directory, GGUF file, or `pkg:<package>/<file>`, a file
    shipped inside an installed Python package) or `from_scratch` (with `train_tokenizer` or `tokenizer`)."""

    path: str | None = Field(None, description="hub id (org/name), local directory, GGUF file, storage URL or "
                             "`pkg:<package>/<file>`; a path that does not exist is an error naming this key")
    tokenizer: str | None = Field(None, description="tokenizer location when it is not next to the model")
    from_scratch: ScratchModel | None = None
    train_tokenizer: TokenizerTraining | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype the weights are loaded in; training precision is compute.precision")
    hf_token: SecretStr | None = Field(None, description="token for gated hub models; never printed")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSource:
        if (self.path is None) == (self.from_scratch is None):
            raise ValueError("give exactly one of `path` and `from_scratch`")
        if self.train_tokenizer is not None and self.from_scratch is None:
            raise ValueError("`train_tokenizer` only goes with `from_scratch` (a pretrained model has its tokenizer)")
        if self.from_scratch is not None and (self.train_tokenizer is None) == (self.tokenizer is None):
            raise ValueError("a `from_scratch` model needs exactly one of `train_tokenizer` and `tokenizer`")
        return self


class FSDPSettings(Strict):
    """FSDP2's mixed precision and offload (compute.distributed: fsdp2, under torchrun)."""

    param_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="dtype the sharded parameters are gathered and computed in (default: their own); "
        "bfloat16 halves the gathers' traffic and memory")
    reduce_dtype: Literal["float32", "bfloat16"] | None = Field(
        None, description="dtype gradients are reduced in across ranks (default: param_dtype); float32 keeps the "
        "reduction exact with bfloat16 parameters")
    cpu_offload: bool = Field(False, description="keep the sharded parameters, gradients and optimizer state in CPU "
                              "memory; the optimizer steps on the CPU")


class Compute(Strict):
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="auto: CUDA, else Apple MPS, else CPU")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="autocast dtype for the forward; fp16 needs CUDA and uses a gradient scaler; bf16 on "
        "MPS needs macOS 14+")
    distributed: Literal["ddp", "fsdp2"] = Field("ddp", description="used when WORLD_SIZE > 1 (torchrun)")
    seed: int = Field(0, description="seed of the model's initialisation, the data order per epoch and sampling")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice)")
    activation_checkpointing: Literal["none", "all"] | int = Field(
        "none", description="recompute blocks' activations in the backward instead of keeping them: none, all "
        "(every decoder layer and extra head), or k (every k-th of them, counted from the first)")
    fsdp: FSDPSettings = FSDPSettings()
    timeout_minutes: float = Field(30.0, gt=0, description="process-group timeout: how long a collective waits for "
                                   "the slowest rank (a checkpoint save, a long evaluation) before the run fails")

    @model_validator(mode="after")
    def _memory_keys(self) -> Compute:
        if isinstance(self.activation_checkpointing, int) and self.activation_checkpointing < 1:
            raise ValueError("activation_checkpointing: k must be >= 1 (or none, all)")
        if self.fsdp.model_fields_set and self.distributed != "fsdp2":
            raise ValueError("`fsdp` only applies to distributed: fsdp2")
        return self

    @property
    def checkpoint_every(self) -> int | None:
        """Every how many blocks activations are recomputed (None: never)."""
        if self.activation_checkpointing == "none":
            return None
        return 1 if self.activation_checkpointing == "all" else self.activation_checkpointing


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_size(text: str) -> int:
    """`5GB`, `500MiB`, `1024` (bytes) -> bytes."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"expected a size such as 5GB, 500MB or 2GiB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").lower()])


class Checkpointing(Strict):
    every_steps: int | None = Field(None, ge=1, description="save every N optimizer steps (and always at the end)")
    keep_last: int = Field(2, ge=1, description="complete checkpoints kept; older ones are removed after a save")
    max_shard_size: str = Field("5GB", description="largest safetensors file of the final model (as Hugging Face "
                                "shards it: model-0000k-of-0000n.safetensors + an index when there are several)")

    @model_validator(mode="after")
    def _size(self) -> Checkpointing:
        if self.max_shard_bytes <= 0:
            raise ValueError("max_shard_size must be positive")
        return self

    @property
    def max_shard_bytes(self) -> int:
        return parse_size(self.max_shard_size)


class Tracking(Strict):
    enabled: bool = Field(True, description="track runs in MLflow when tracking.backends names mlflow (false: "
                          "no MLflow run; the switch configs used before tracking.backends, kept for them)")
    tracking_uri: str | None = Field(None, description="default: sqlite store under the output directory (a "
                                     "tracking server: http://host:5000)")
    experiment: str = Field("wmtp", description="MLflow experiment the runs go to (created when missing)")
    artifact_location: str | None = Field(
        None, description="where a new experiment keeps its artifacts (e.g. s3://bucket/mlflow); default: the "
        "store's own (a local store: <output_dir>/mlartifacts)")
    log_model: bool = Field(True, description="upload the final model directory as a run artifact")
    log_model_max_size: str = Field("2GB", description="a final model larger than this is not uploaded to MLflow "
                                    "(a 7B model is not copied by accident); its location is logged instead")

    @property
    def log_model_max_bytes(self) -> int:
        return parse_size(self.log_model_max_size)

    @model_validator(mode="after")
    def _size(self) -> Tracking:
        self.log_model_max_bytes  # noqa: B018  (parses, or raises naming the value)
        return self


class TrackingBackends(Strict):
    backends: list[Literal["mlflow", "tensorboard"]] = Field(
        ["mlflow"], description="where a run's metrics go besides its run.json and metrics.jsonl: mlflow (the "
        "mlflow section's store), tensorboard (event files in <run_dir>/tensorboard and an evaluation's "
        "<eval_dir>/tensorboard; needs `pip install tensorboard`); one, both or [] for neither")


class StorageSettings(Strict):
    staging_dir: str | None = Field(
        None, description="local directory where a run whose output_dir is a storage URL is written before its "
        "upload (default $WMTP_CACHE/runs)")
    upload_retries: int = Field(5, ge=0, description="retries of a failed upload, with exponential backoff, before "
                                "the run stops with an error")
    retry_backoff_seconds: float = Field(2.0, ge=0, description="wait before the first retry; doubled each time")


class Logging(Strict):
    log_every: int = Field(10, ge=1, description="optimizer steps between metric logs")
    progress: bool = Field(True, description="console progress bar with ETA")


class FromFile(Strict):
    """What a config and a recipe share: top-level keys this schema does not know are kept as given for the
    weighting schemes to validate (`sections`), and each remembers its file and its `--set` overrides for error
    messages."""

    model_config = ConfigDict(extra="allow", frozen=True)
    _source: str = PrivateAttr("file")  # the file it came from
    _overrides: dict[str, str] = PrivateAttr(default_factory=dict)  # dotted key -> its `--set` argument

    @property
    def sections(self) -> dict[str, Any]:
        """The top-level keys this schema does not know: the weighting schemes', as written (or as validated)."""
        return dict(self.model_extra or {})

    @property
    def source(self) -> str:
        """The file this was read from ("config" or "recipe" when it was built in code)."""
        return self._source

    @property
    def overrides(self) -> dict[str, str]:
        """The `--set` overrides applied over the file: dotted key -> the argument as given."""
        return self._overrides

    def where(self, key: str) -> str:
        """What set `key`: its `--set` argument, else the file (for error messages)."""
        return override_for(key, self._overrides) or self._source


class Config(FromFile):
    """Where and how to run. Top-level keys a weighting scheme owns (Rho-1's `reference_model`) are kept here as
    given and validated by their scheme (`wmtp.weighting.checked_config`), so this file knows no scheme."""

    _source: str = PrivateAttr("config")

    model: ModelSource
    datasets: dict[str, str] = Field(default_factory=dict, description="name -> file or directory")
    output_dir: str = Field("runs", description="a directory, or a storage URL (s3://bucket/runs) that runs are "
                            "uploaded to")
    compute: Compute = Field(Compute(), description="device, precision, seed, threads and distributed training")
    checkpoint: Checkpointing = Field(Checkpointing(), description="how often checkpoints are saved and kept")
    tracking: TrackingBackends = Field(TrackingBackends(), description="the trackers a run writes to")
    mlflow: Tracking = Field(Tracking(), description="MLflow tracking: store, experiment, model upload")
    storage: StorageSettings = Field(StorageSettings(), description="a remote output_dir's staging and upload "
                                     "retries")
    logging: Logging = Field(Logging(), description="metric logging and console progress")
    trunk_cache: str | None = Field(
        None, description="file of the frozen trunk's states written by `wmtp cache-states`; with mtp.trainable: "
        "heads, training and validation read it instead of running the trunk (a fingerprint mismatch is an error)")

    def with_sections(self, sections: dict[str, Any]) -> Config:
        """This config with its extra keys replaced by `sections` (validated by their schemes, defaults included);
        keys the file and `--set` did not set stay unset, so `resolved_yaml` leaves them out."""
        values = {name: getattr(self, name) for name in type(self).model_fields}
        checked = type(self).model_construct(_fields_set=self.model_fields_set, **values, **sections)
        checked._source, checked._overrides = self._source, self._overrides
        return checked


# --------------------------------------------------------------------------------------------- recipe
class MTPShape(Strict):
    n_heads: int = Field(4, ge=1, description="heads including head 0; 4 is best at 32k vocabularies (Meta)")
    head_type: Literal["transformer", "linear", "sequential"] = Field(
        "transformer", description="transformer: each extra head a copy of the last decoder layer (Meta); linear: a "
        "residual linear map of the trunk's output (Medusa-style, cheap drafts); sequential: DeepSeek-V3 MTP modules, "
        "depth k mixes depth k-1's state with the embedding of the token k ahead (docs/method.md §2.1)")
    head_coef: list[float] | None = Field(
        None, description="λ_h per head, explicit (default all 1, Meta); or give `head_coef_rule` instead, not both")
    head_coef_rule: Literal["meta", "deepseek", "geometric"] | None = Field(
        None, description="λ_h by a convention (docs/method.md §3): meta: all 1; deepseek: [1, λ/D, …, λ/D] with "
        "D = n-1 and λ = head_coef_scale (DeepSeek-V3, Megatron's mtp_loss_scaling_factor); geometric: [1, γ, γ², …] "
        "with γ = head_coef_decay (EAGLE-3, FastMTP). Default: head_coef, or all 1")
    head_coef_scale: float | None = Field(
        None, ge=0, description="deepseek rule only: λ, the budget the n-1 extra heads share (default 0.3; "
        "DeepSeek-V3 0.3, then 0.1)")
    head_coef_decay: float | None = Field(
        None, gt=0, le=1, description="geometric rule only: γ, head k weighs γ^k (default 0.8, EAGLE-3)")
    trainable: Literal["all", "heads"] = Field(
        "all", description="all: full fine-tuning; heads: only the extra heads 1…n-1 train, the base model (head 0, "
        "trunk, norm, embeddings, unembedding) stays frozen: drafts for self-speculative decoding on an unchanged "
        "model")

    @model_validator(mode="after")
    def _coef_length(self) -> MTPShape:
        if self.trainable == "heads" and self.n_heads < 2:
            raise ValueError("trainable: heads needs extra heads to train (n_heads >= 2)")
        if self.head_coef is not None:
            if self.head_coef_rule is not None:
                raise ValueError("give `head_coef` (an explicit list) or `head_coef_rule`, not both")
            if len(self.head_coef) != self.n_heads:
                raise ValueError(f"head_coef has {len(self.head_coef)} values for n_heads={self.n_heads}")
            if any(c < 0 for c in self.head_coef):
                raise ValueError("head_coef values must be >= 0")
        for key, rule in (("head_coef_scale", "deepseek"), ("head_coef_decay", "geometric")):
            if getattr(self, key) is not None and self.head_coef_rule != rule:
                raise ValueError(f"`{key}` applies to head_coef_rule: {rule} only "
                                 f"(head_coef_rule is {self.head_coef_rule or 'not set'})")
        return self

    @property
    def coefficients(self) -> list[float]:
        """λ_h for heads 0…n-1: the explicit `head_coef`, or `head_coef_rule` resolved (docs/method.md §3). The one
        place the loss's head coefficients come from; neither key given: all 1 (Meta)."""
        n = self.n_heads
        if self.head_coef is not None:
            return [float(c) for c in self.head_coef]
        if self.head_coef_rule == "deepseek":
            scale = 0.3 if self.head_coef_scale is None else self.head_coef_scale
            return [1.0] + [scale / (n - 1) for _ in range(n - 1)]
        if self.head_coef_rule == "geometric":
            decay = 0.8 if self.head_coef_decay is None else self.head_coef_decay
            return [decay ** k for k in range(n)]
        return [1.0] * n


class LossSettings(Strict):
    reduction: Literal["token_mean", "weight_mean"] = Field(
        "token_mean", description="token_mean: Σ w·ℓ / number of valid pairs; weight_mean: Σ w·ℓ / Σ w (docs/method.md "
        "§3); over the whole step, all ranks")
    chunk_size: int = Field(
        256, ge=1, description="valid (token, head) pairs per CE chunk on the fast path: peak memory ~ chunk x V")


SourceKind = Literal["mbpp", "humaneval", "codecontests", "jsonl", "hf", "python-stdlib"]


class DataSource(Strict):
    kind: SourceKind = Field(description="mbpp, humaneval, codecontests, jsonl (your own file), hf (a hub "
                             "dataset) or python-stdlib (the running Python's standard library)")
    dataset: str | None = Field(None, description="name in the config's `datasets` (a path), or a hub id for hf")
    split: str | None = Field(None, description="mbpp/hf split (train, validation, test)")
    limit: int | None = Field(None, ge=1, description="use at most this many records")
    text_field: str = Field("text", description="jsonl/hf: field holding plain text")
    incorrect_solutions: bool = Field(
        False, description="codecontests: also yield the incorrect Python solutions (meta label 0; correct ones have "
        "label 1)")

    @model_validator(mode="after")
    def _keys_of_kind(self) -> DataSource:
        applies = {"split": ("mbpp", "codecontests", "hf"), "text_field": ("jsonl", "hf"),
                   "incorrect_solutions": ("codecontests",)}
        for key, kinds in applies.items():
            if key in self.model_fields_set and self.kind not in kinds:
                raise ValueError(f"`{key}` does not apply to kind {self.kind} (only {', '.join(kinds)})")
        return self


class DataSettings(Strict):
    train: list[DataSource] = Field(min_length=1, description="the sources of the training examples, read in order")
    validation: list[DataSource] | None = Field(None, description="default: hold out validation_fraction of train")
    validation_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="share of train held out for "
                                       "validation, by a hash of each example's key (deterministic)")
    max_length: int = Field(512, ge=8, description="tokens per training sequence")
    packing: bool = Field(True, description="pack documents into full sequences, labels stop at boundaries")
    mask_prompt: bool = Field(False, description="exclude prompt tokens from the loss (targets = solution only)")
    shuffle_seed: int = Field(0, description="seed of the order in which documents are packed into rows")

    @model_validator(mode="after")
    def _holdout_or_sources(self) -> DataSettings:
        if self.validation is not None and "validation_fraction" in self.model_fields_set:
            raise ValueError("give `validation` sources or `validation_fraction`, not both")
        return self


class Optimizer(Strict):
    lr: float = Field(3e-4, gt=0, description="peak learning rate of AdamW")
    weight_decay: float = Field(0.1, ge=0, description="AdamW's decoupled weight decay (not on norms and biases)")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW's moment decay rates (β1, β2)")
    eps: float = Field(1e-8, gt=0, description="AdamW's denominator floor")
    grad_clip: float | None = Field(1.0, gt=0, description="max global gradient norm; null disables clipping")


class Schedule(Strict):
    kind: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay of the lr after warm-up "
                                                          "to min_lr_ratio × lr (constant: none)")
    warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear warm-up from 0 to lr")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final lr as a fraction of optim.lr")

    @model_validator(mode="after")
    def _ratio_needs_decay(self) -> Schedule:
        if self.kind == "constant" and "min_lr_ratio" in self.model_fields_set:
            raise ValueError("`min_lr_ratio` does not apply to kind constant")
        return self


class EarlyStopping(Strict):
    metric: str = Field("val/loss", description="a validation metric, e.g. val/loss, val/acc_head0 or "
                        "val/tokens_per_forward (with mode max)")
    mode: Literal["min", "max"] = Field("min", description="min: lower is better (losses); max: higher (accuracies)")
    patience: int = Field(3, ge=1, description="evaluations without improvement before stopping")
    min_delta: float = Field(0.0, ge=0, description="smallest change that counts as an improvement")


class Training(Strict):
    micro_batch_size: int = Field(8, ge=1, description="sequences per micro-batch per process")
    grad_accum_steps: int = Field(1, ge=1, description="micro-batches per optimizer step and process")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps of the run (or num_epochs)")
    num_epochs: float | None = Field(None, gt=0, description="passes over the training rows (when max_steps is not "
                                     "given)")
    eval_every: int | None = Field(None, ge=1, description="optimizer steps between validations (and at the end)")
    eval_batches: int | None = Field(None, ge=1, description="cap on validation micro-batches")
    early_stopping: EarlyStopping | None = Field(None, description="stop when a validation metric stops improving")

    @model_validator(mode="after")
    def _length(self) -> Training:
        if self.max_steps is None and self.num_epochs is None:
            raise ValueError("give max_steps or num_epochs")
        if self.early_stopping is not None and self.eval_every is None:
            raise ValueError("early_stopping needs eval_every")
        return self


class Recipe(FromFile):
    """What to train. The weighting scheme's own sections (`rho1`, `critic`, `pretrain`, ...) are owned and
    validated by the scheme (`wmtp.weighting`); here they are kept as given, so this file knows no scheme."""

    _source: str = PrivateAttr("recipe")

    algorithm: str = Field(
        "baseline-mtp", description="the weighting scheme (wmtp.weighting.SCHEMES): baseline-mtp (uniform weights; "
        "n_heads=1 is next-token training), rho1 (excess loss against config.reference_model), critic (value "
        "function)")
    mtp: MTPShape = Field(MTPShape(), description="the heads: how many, which kind, their coefficients, what trains")
    loss: LossSettings = Field(LossSettings(), description="how the weighted CE is normalised and chunked")
    data: DataSettings = Field(description="training and validation sources, sequence length, packing")
    optim: Optimizer = Field(Optimizer(), description="AdamW and gradient clipping")
    schedule: Schedule = Field(Schedule(), description="the learning-rate schedule")
    train: Training = Field(description="batch sizes, length of the run, validation, early stopping")



# --------------------------------------------------------------------------------------------- loading
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def substitute_env(value: Any, where: str, env: dict[str, str] | None = None, key: str = "") -> Any:
    """Replace `${VAR}` and `${VAR:-default}` in every string of a parsed YAML tree. An unset variable without a
    default is reported as `where: key: ...` (`where` the file, `key` the dotted key of `value` inside it)."""
    env = os.environ if env is None else env
    if isinstance(value, dict):
        return {k: substitute_env(v, where, env, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute_env(v, where, env, f"{key}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        at = f"{where}: {key}" if key else where
        raise ConfigError(f"{at}: environment variable {name} is not set (use ${{{name}:-default}} for a default)")

    return _VAR.sub(replace, value)


def describe_error(error: ValidationError, path: Path | str, overrides: dict[str, str] | None = None) -> str:
    """One line naming the file (or the `--set` override) and the key of a validation error's first problem."""
    first = error.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    where = override_for(loc, overrides) or path
    if first["type"] == "extra_forbidden":
        return f"{where}: {loc}: unknown key"
    if first["type"] == "missing":
        return f"{where}: {loc}: required key missing"
    return f"{where}: {loc}: {first['msg'].removeprefix('Value error, ')} (got {first.get('input')!r})"


def override_for(key: str, overrides: dict[str, str] | None) -> str | None:
    """`--set <key>=<value>` when an override set `key`, a key inside it or a section holding it; else None."""
    for dotted, text in (overrides or {}).items():
        if key == dotted or key.startswith(dotted + ".") or dotted.startswith(key + "."):
            return f"--set {text}"
    return None


def load_yaml(path: str | os.PathLike, schema: type[BaseModel], overrides: dict[str, Any] | None = None,
              texts: dict[str, str] | None = None) -> BaseModel:
    """Read, substitute and validate one YAML file, with `overrides` (dotted key -> parsed value) set into it
    before validation; relative paths inside stay relative to the CWD. `texts` (dotted key -> the `--set`
    argument) names an override in the error it causes."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{line} invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    raw = substitute_env(raw, str(path))
    for key, value in (overrides or {}).items():
        _set_key(raw, key, value, f"--set {(texts or {}).get(key, key)}")
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(describe_error(exc, path, texts)) from None


def _set_key(tree: dict, key: str, value: Any, where: str) -> None:
    """Set a dotted key (`train.max_steps`, `data.train.0.limit`) in a parsed YAML tree; missing mappings on the
    way are created, a list is indexed by a number."""
    node: Any = tree
    parts = key.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{where}: {'.'.join(parts[:i])} is a list of {len(node)}: expected an index "
                                  f"0-{len(node) - 1}, got `{part}`")
            part = int(part)
        elif not isinstance(node, dict):
            raise ConfigError(f"{where}: {'.'.join(parts[:i])} is a value ({node!r}), not a section")
        elif not last and node.get(part) is None:
            node[part] = {}
        if last:
            node[part] = value
        else:
            node = node[part]


def parse_overrides(items: list[str], config_keys: Collection[str] = ()) -> tuple[dict[str, Any], dict[str, Any],
                                                                              dict[str, str]]:
    """`--set key=value` arguments -> (config overrides, recipe overrides, dotted key -> argument text).

    A key names its file by its first part: a config section (`compute.seed`, `output_dir`, or one of
    `config_keys`, the top-level config keys the weighting schemes own) is the config's, anything else the
    recipe's (`train.max_steps`, `rho1.temperature`); `config.` / `recipe.` in front says it explicitly.
    The value is read as YAML (`10` an integer, `1e-4` a number, `null`, `[1, 0.5]` a list, `true`)."""
    config: dict[str, Any] = {}
    recipe: dict[str, Any] = {}
    texts: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item}: expected key=value, e.g. --set train.max_steps=10")
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item}: the value is not valid YAML ({getattr(exc, 'problem', exc)})") from None
        target, _, rest = key.partition(".")
        if target in ("config", "recipe") and rest:
            chosen, key = (config if target == "config" else recipe), rest
        else:
            chosen = config if target in Config.model_fields or target in config_keys else recipe
        if key in chosen:
            raise ConfigError(f"--set {item}: `{key}` is set twice")
        chosen[key] = parsed
        texts[key] = item
    return config, recipe, texts


def load_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None,
                texts: dict[str, str] | None = None) -> Config:
    config = load_yaml(path, Config, overrides, texts)
    config._source = str(path)
    config._overrides = {k: (texts or {}).get(k, k) for k in overrides or {}}
    return config


# Names of the earlier WMTP project and what each is now (a recipe that uses one gets this in its error).
LEGACY_ALGORITHMS = {
    "rho1-weighted": "algorithm: rho1 with rho1.mode: weighted",
    "rho1-wmtp": "algorithm: rho1 with rho1.mode: weighted",
    "rho1-tokenskip": "algorithm: rho1 with rho1.mode: token_skip",
    "rho1-topk": "algorithm: rho1 with rho1.mode: topk",
    "critic-wmtp": "algorithm: critic",
    "mtp-baseline": "algorithm: baseline-mtp",
}


def load_recipe(path: str | os.PathLike, overrides: dict[str, Any] | None = None,
                texts: dict[str, str] | None = None) -> Recipe:
    """The recipe's general sections are validated here; its scheme's sections by `wmtp.weighting.scheme_for`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(missing_recipe_message(path))
    recipe = load_yaml(path, Recipe, overrides, texts)
    recipe._source = str(path)
    recipe._overrides = {k: (texts or {}).get(k, k) for k in overrides or {}}
    check_heads_fit(recipe)
    return recipe


def check_heads_fit(recipe: Recipe) -> None:
    """Head h at position t predicts x[t+1+h] (docs/method.md §1): a sequence of L tokens gives head h a target
    only when h <= L - 2. A head that can never have one would train on nothing and report nothing."""
    n, length = recipe.mtp.n_heads, recipe.data.max_length
    if n > length - 1:
        where = (override_for("mtp.n_heads", recipe.overrides) or override_for("data.max_length", recipe.overrides)
                 or recipe.source)
        raise ConfigError(f"{where}: mtp.n_heads: {n} heads need data.max_length >= {n + 1} (got {length}): head h "
                          f"predicts the token h+1 ahead, so heads {length - 1}-{n - 1} would never have a target")


def missing_recipe_message(path: Path) -> str:
    """`<path>: file not found`, with the recipes that exist beside it (and the new name of a `recipe.<name>.yaml`
    file of the earlier project)."""
    folder = path.parent
    recipes = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.y*ml")
                     if _looks_like_recipe(p)) if folder.is_dir() else []
    renamed = folder / path.name.removeprefix("recipe.")
    hint = (f" (recipe files are named <name>.yaml now: {renamed})"
            if path.name.startswith("recipe.") and renamed.is_file() else "")
    listing = f"; recipes in {folder}: {', '.join(recipes)}" if recipes else ""
    return f"{path}: file not found{hint}{listing}"


def _looks_like_recipe(path: Path) -> bool:
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and "train" in raw and "data" in raw


def flatten(model: BaseModel, prefix: str = "") -> dict[str, str]:
    """`a.b.c -> value` for logging as parameters; secrets are masked. Extra keys count once validated (a scheme's
    config keys after `wmtp.weighting.checked_config`); sections as given (mappings, lists) are left out: a
    recipe's are logged from its scheme's settings."""
    out: dict[str, str] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, BaseModel):
            checked = [k for k, v in (value.model_extra or {}).items() if not isinstance(v, dict | list)]
            for name in [*type(value).model_fields, *checked]:
                walk(getattr(value, name), f"{key}.{name}" if key else name)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}")
        elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
            for i, v in enumerate(value):
                walk(v, f"{key}.{i}")
        elif isinstance(value, SecretStr):
            out[key] = "**********"
        else:
            out[key] = str(value)

    walk(model, prefix)
    return out


# A run directory keeps the config and the recipe it ran with (overrides applied), loadable with load_config /
# load_recipe: `wmtp eval` of its checkpoints needs no --config / --recipe.
RUN_CONFIG_FILE = "config.yaml"
RUN_RECIPE_FILE = "recipe.yaml"


def resolved_yaml(model: BaseModel) -> str:
    """YAML of a validated config or recipe that loads back to the same values: the keys that were set (in the file
    or by an override), secrets left out (a reader gives its own, e.g. through HF_TOKEN)."""
    def without_secrets(value: Any, tree: Any) -> Any:
        if isinstance(value, BaseModel):
            # pydantic dumps extra keys even when unset: a scheme key's default is left out like a field's
            return {k: without_secrets(getattr(value, k, None), v) for k, v in tree.items()
                    if not isinstance(getattr(value, k, None), SecretStr) and k in value.model_fields_set}
        if isinstance(value, list | tuple) and isinstance(tree, list):
            return [without_secrets(v, t) for v, t in zip(value, tree, strict=True)]
        return tree

    return yaml.safe_dump(without_secrets(model, model.model_dump(mode="json", exclude_unset=True)), sort_keys=False)


def dump_masked(model: BaseModel) -> str:
    """YAML of a validated config with secrets masked (for --verbose)."""
    return yaml.safe_dump(model.model_dump(mode="json"), sort_keys=False)

