"""Typed settings of `wmtp eval` and `wmtp execute`, built by the CLI at the door (no argparse namespace travels
further). Light: importing this module loads neither torch nor transformers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError
from ..execution.sandbox import Limits
from ..runtime.storage import fetch, is_remote

PROMPT_FORMATS = ("raw", "chat")
RUN_CONFIG, RUN_RECIPE = "config.yaml", "recipe.yaml"  # the resolved files a training run writes beside final/


@dataclass(frozen=True)
class Sampling:
    """How completions are sampled: n per problem, temperature (0: greedy), top-p, length, batch, seed, and the
    prompt format (`raw`: the benchmark prompt continued as code; `chat`: an instruction in the tokenizer's chat
    template, the code taken from the reply's first code block; see wmtp.execution.problems)."""

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 384
    batch_size: int = 16
    seed: int = 0
    prompt_format: str = "raw"

    def __post_init__(self) -> None:
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt format must be one of {', '.join(PROMPT_FORMATS)}, got {self.prompt_format}")
        if self.n < 1:
            raise ValueError("n must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        if self.temperature == 0 and self.n > 1:
            raise ValueError("greedy decoding (temperature 0) gives one sample per problem: use n 1 or a temperature")


@dataclass(frozen=True)
class Scoring:
    """Whether and how samples are executed (in the sandbox) and scored: the k of pass@k, the bootstrap seed."""

    allow_code_execution: bool = False
    isolation: str = "auto"  # auto, bwrap, unshare or none (none must be asked for explicitly)
    limits: Limits = Limits()
    workers: int = 2
    ks: tuple[int, ...] = (1, 10)
    seed: int = 0


@dataclass(frozen=True)
class EvalSettings:
    """`wmtp eval`: which checkpoint, which benchmarks, how to sample, what else to measure, where to write."""

    checkpoint: str | None = None  # a path or a storage URL; None: the config's model as it is
    benchmarks: tuple[str, ...] = ("mbpp", "humaneval")
    split: str = "test"
    limit: int | None = None
    sampling: Sampling = Sampling()
    scoring: Scoring = Scoring()
    heads_skipped: str | None = None  # why head quality is not measured; None: it is
    head_batches: int | None = None
    speculative_prompts: int = 16
    out: Path | None = None


@dataclass(frozen=True)
class ExecuteSettings:
    """`wmtp execute`: a generations file to judge, and where to write the results (default: beside it)."""

    generations: Path
    scoring: Scoring = Scoring()
    out: Path | None = None


def run_of(checkpoint: str) -> str:
    """The training run directory (a path or URL) of `<run>/final` or `<run>/checkpoints/step-N`."""
    parts = str(checkpoint).rstrip("/").rsplit("/", 2)
    return parts[0] if len(parts) == 3 and parts[1] == "checkpoints" else str(checkpoint).rstrip("/").rsplit("/", 1)[0]


def run_file(checkpoint: str, name: str) -> Path | None:
    """The local copy of `name` in the checkpoint's training run (fetched when the run is remote), None if the run
    has none (runs trained before wmtp wrote its config and recipe beside them)."""
    run = run_of(checkpoint)
    if not is_remote(run):
        path = Path(run.removeprefix("file://")) / name
        return path if path.is_file() else None
    import fsspec

    fs, root = fsspec.core.url_to_fs(f"{run}/{name}")
    return fetch(f"{run}/{name}", "--checkpoint's run") if fs.exists(root) else None


def eval_files(config: Path | None, recipe: Path | None, checkpoint: str | None) -> tuple[Path, Path | None]:
    """`wmtp eval`'s config and recipe: the ones given, else the checkpoint's run's own.
    No config is an error (it says where the model, data and store are); no recipe is None (head quality, which
    needs the recipe's held-out data, is then skipped)."""
    if config is None:
        if checkpoint is None:
            raise ConfigError("--config is needed: without --checkpoint the model evaluated is the config's model.path")
        config = run_file(checkpoint, RUN_CONFIG)
        if config is None:
            raise ConfigError(f"--config is needed: {run_of(checkpoint)} holds no {RUN_CONFIG} (the run's config, "
                              "written by training since it was added); pass the config the run was trained with")
    if recipe is None and checkpoint is not None:
        recipe = run_file(checkpoint, RUN_RECIPE)
    return config, recipe
