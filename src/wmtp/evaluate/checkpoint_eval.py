"""`wmtp eval`, `wmtp execute` and `wmtp report`: evaluate a checkpoint end to end.

Order (nothing runs model-written code before its generations are on disk):
1. load the checkpoint (a saved model directory or a training checkpoint) and its tokenizer;
2. generate completions for each benchmark and write generations.jsonl;
3. only with --allow-code-execution: judge every sample in the sandbox (executions.jsonl), pass@k with CIs;
4. head quality on the recipe's held-out data; self-speculative decoding statistics on benchmark prompts;
5. results.json, report.md with plots, and an MLflow run with the metrics and these files.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoTokenizer

from ..atomic import atomic_file
from ..checkpoint import STATE_FILE, TOKENIZER_DIR, load_checkpoint_model
from ..config import Config, ConfigError, Recipe
from ..data import load_examples, recipe_sequences
from ..distributed import DistInfo, broadcast_object, init_distributed, shutdown
from ..execution.problems import Problem, load_problems
from ..execution.samples import execute, read_generations
from ..execution.sandbox import Sandbox
from ..head_quality import head_quality
from ..mirror import local_output_dir
from ..model import HEADS_FILE, MTPModel
from ..runtime import DTYPES, autocast_for, load_model_as_is, load_tokenizer_from, quiet_library_progress, secret
from ..storage import local_path
from ..tracking import Tracker
from .generation import generate_samples, raw_inputs
from .passk import summarize
from .report import find_results, write_json, write_reports
from .settings import EvalSettings, ExecuteSettings, Scoring


def load_evaluated_model(checkpoint: Path, dtype: torch.dtype | None = None) -> tuple[MTPModel, object, Path]:
    """(model, tokenizer, run directory) of a saved model directory (final/) or a training checkpoint, its
    weights in `dtype` (None: as saved)."""
    if (checkpoint / STATE_FILE).is_file():
        return (load_checkpoint_model(checkpoint, dtype),
                AutoTokenizer.from_pretrained(str(checkpoint / TOKENIZER_DIR)), checkpoint.parent.parent)
    if (checkpoint / "config.json").is_file() and (checkpoint / HEADS_FILE).is_file():
        return (MTPModel.from_pretrained(checkpoint, dtype=dtype), AutoTokenizer.from_pretrained(str(checkpoint)),
                checkpoint.parent)
    raise ConfigError(f"--checkpoint {checkpoint}: not a wmtp model directory (config.json and {HEADS_FILE}) or a "
                      f"training checkpoint ({STATE_FILE})")


def write_jsonl(path: Path, records: list[dict]) -> None:
    with atomic_file(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def run_passk(records: list[dict], scoring: Scoring, out: Path, generation: dict) -> dict:
    started = time.monotonic()
    sandbox = Sandbox(scoring.limits, isolation=scoring.isolation, allow_unisolated=scoring.isolation == "none")
    results = execute(records, sandbox, workers=scoring.workers)
    write_jsonl(out / "executions.jsonl", results)
    summary = summarize(results, list(scoring.ks), generation=generation, seed=scoring.seed)
    summary["seconds"] = round(time.monotonic() - started, 1)
    return summary


def evaluate_checkpoint(config: Config, recipe: Recipe, settings: EvalSettings) -> tuple[Path, dict]:
    """Evaluate; under torchrun every rank generates its share of the batches and rank 0 does the rest (returns
    (out, {}) on the other ranks)."""
    info = init_distributed(config.compute.device)
    try:
        return _evaluate(config, recipe, settings, info)
    finally:
        shutdown()


def load_for_evaluation(config: Config, settings: EvalSettings) -> tuple[MTPModel, object, Path]:
    """(model, tokenizer, directory the evaluation goes under) of --checkpoint, or without it of the config's
    model as it is (the unmodified model; its evaluations go under the config's output_dir)."""
    if settings.checkpoint is not None:  # in the config's model.dtype, like the model it was trained from
        return load_evaluated_model(Path(local_path(settings.checkpoint, "--checkpoint")), DTYPES[config.model.dtype])
    source = config.model
    model = load_model_as_is(source)  # refuses a from-scratch model first
    tokenizer = load_tokenizer_from(source.tokenizer or source.path, secret(source.hf_token))
    return model, tokenizer, local_output_dir(config.output_dir, config.storage.staging_dir)


def _evaluate(config: Config, recipe: Recipe, settings: EvalSettings, info: DistInfo) -> tuple[Path, dict]:
    if not config.logging.progress or not info.is_main:
        quiet_library_progress()
    device = info.device
    model, tokenizer, run_dir = load_for_evaluation(config, settings)
    model = model.to(device).eval()
    tokenizer.padding_side = "left"
    autocast = autocast_for(device, config.compute.precision)
    name = settings.checkpoint or f"{config.model.path} (as is)"
    default_out = run_dir / f"eval-{'' if settings.checkpoint else 'base-'}{time.strftime('%Y%m%d-%H%M%S')}"
    out = settings.out or broadcast_object(default_out, info)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    results: dict = {"checkpoint": str(name), "device": str(device), "precision": config.compute.precision,
                     "dtype": str(model.unembedding.weight.dtype).removeprefix("torch."),
                     "processes": info.world_size}

    problems = []
    for benchmark in settings.benchmarks:
        problems += load_problems(benchmark, config.datasets.get(benchmark), split=settings.split,
                                  limit=settings.limit)
    if problems:
        sampling = settings.sampling
        stats: dict = {}
        with autocast:
            records = generate_samples(model, tokenizer, problems, sampling, device=device, model_name=str(name),
                                       rank=info.rank, world_size=info.world_size, stats=stats,
                                       progress=_log if config.logging.progress else None)
        records, stats = gather_generations(records, stats, problems, info)
        if not info.is_main:
            return out, {}
        write_jsonl(out / "generations.jsonl", records)
        generation = records[0]["generation"] | stats
        results["generations"] = str(out / "generations.jsonl")
        if settings.scoring.allow_code_execution:
            results["passk"] = run_passk(records, settings.scoring, out, generation)
        else:
            results["passk"] = {"generation": generation, "ks": list(settings.scoring.ks), "benchmarks": {},
                                "note": "not executed (no --allow-code-execution)"}
    elif not info.is_main:
        return out, {}
    if settings.heads:
        results["heads"] = held_out_head_quality(model, tokenizer, config, recipe, device, autocast,
                                                 settings.head_batches)
    if model.n_heads > 1 and problems and settings.speculative_prompts > 0:
        results["speculative"] = speculative_statistics(model, tokenizer, problems[:settings.speculative_prompts],
                                                        settings.sampling.max_new_tokens, device, autocast)
    write_json(out / "results.json", results)
    files = write_reports(out, [out.name], [results], [run_dir])
    log_to_mlflow(config, results, [out / "results.json", *files] + [p for p in (out / "generations.jsonl",
                  out / "executions.jsonl") if p.is_file()], out.name, run_dir)
    return out, results


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def gather_generations(records: list[dict], stats: dict, problems: list[Problem],
                       info: DistInfo) -> tuple[list[dict], dict]:
    """Every rank's records in problem order (on every rank), and the generation statistics: tokens summed over
    ranks, seconds of the slowest rank, tokens per second of the whole job."""
    if info.distributed:
        everything: list = [None] * info.world_size
        dist.all_gather_object(everything, (records, stats))
        records = [r for rank_records, _ in everything for r in rank_records]
        position = {(p.benchmark, p.task_id): i for i, p in enumerate(problems)}
        records.sort(key=lambda r: (position[(r["benchmark"], r["task_id"])], r["sample"]))
        stats = {"generated_tokens": sum(s["generated_tokens"] for _, s in everything),
                 "batches": sum(s["batches"] for _, s in everything),
                 "seconds": max(s["seconds"] for _, s in everything)}
    seconds = stats["seconds"]
    return records, {"generated_tokens": stats["generated_tokens"], "batches": stats["batches"],
                     "seconds": round(seconds, 1), "processes": info.world_size,
                     "tokens_per_second": round(stats["generated_tokens"] / seconds, 2) if seconds else None}


def held_out_head_quality(model, tokenizer, config: Config, recipe: Recipe, device, autocast,
                          max_batches: int | None) -> dict | None:
    """Head quality on the recipe's validation data (its `validation` sources or its hold-out of train)."""
    _, validation = load_examples(recipe.data, config.datasets)
    if not validation:
        return None
    sequences = recipe_sequences(validation, tokenizer, recipe.data, 0)  # as the trainer builds its validation set
    report = head_quality(model, sequences, batch_size=recipe.train.micro_batch_size,
                          mask_prompt=recipe.data.mask_prompt,
                          chunk_size=recipe.loss.chunk_size, device=device, autocast=autocast,
                          max_batches=max_batches)
    report["examples"] = len(validation)
    return report


def speculative_statistics(model, tokenizer, problems, max_new_tokens: int, device, autocast) -> dict:
    """Greedy self-speculative decoding on benchmark prompts: acceptance per head and mean accepted length."""
    from .speculative import speculative_generate

    proposed = accepted = None
    tokens = forwards = 0
    started = time.monotonic()
    for problem in problems:
        ids = torch.tensor(raw_inputs(tokenizer, [problem]), device=device)  # as generation starts prompts
        with autocast or nullcontext():
            result = speculative_generate(model, ids, max_new_tokens, eos_token_id=tokenizer.eos_token_id)
        proposed = result.proposed if proposed is None else [a + b for a, b in zip(proposed, result.proposed,
                                                                                      strict=True)]
        accepted = result.accepted if accepted is None else [a + b for a, b in zip(accepted, result.accepted,
                                                                                      strict=True)]
        tokens += len(result.tokens)
        forwards += result.forward_passes
    return {"prompts": len(problems), "tokens": tokens, "forward_passes": forwards,
            "mean_accepted_length": tokens / forwards if forwards else None,
            "acceptance_per_head": [a / p if p else None for a, p in zip(accepted, proposed, strict=True)],
            "seconds": round(time.monotonic() - started, 1)}


def flat_metrics(results: dict) -> dict[str, float]:
    """The numbers of a results dict as MLflow metrics (missing values are left out, never defaulted)."""
    metrics = {}
    for benchmark, entry in results.get("passk", {}).get("benchmarks", {}).items():
        for name, value in entry["pass@k"].items():
            if value is not None:  # MLflow names allow no "@"
                metrics[f"eval/{benchmark}/{name.replace('@', '_at_')}"] = value["mean"]
    for head in (results.get("heads") or {}).get("heads", []):
        for key in ("ce", "ppl", "acc"):
            if head[key] is not None:
                metrics[f"eval/{key}_head{head['head']}"] = head[key]
    spec = results.get("speculative") or {}
    if spec.get("mean_accepted_length") is not None:
        metrics["eval/spec_mean_accepted_length"] = spec["mean_accepted_length"]
    return metrics


def log_to_mlflow(config: Config, results: dict, files: list[Path], name: str, run_dir: Path) -> None:
    # the store next to the training runs (a remote output_dir's local staging directory)
    tracker = Tracker(config.mlflow, local_output_dir(config.output_dir, config.storage.staging_dir), name, active=True,
                      tags={"kind": "evaluation", "checkpoint": results.get("checkpoint", "")})
    try:
        tracker.log_metrics(flat_metrics(results), step=0)
        for path in files:
            tracker.log_artifact(path, "evaluation")
    finally:
        tracker.end("FINISHED")
    results["mlflow_run_id"] = tracker.run_id


def execute_generations(settings: ExecuteSettings) -> tuple[Path, dict]:
    """`wmtp execute`: judge a generations file on its own (e.g. produced elsewhere)."""
    records = read_generations(settings.generations)
    out = settings.out or settings.generations.parent
    out.mkdir(parents=True, exist_ok=True)
    generation = records[0].get("generation", {})
    results = {"generations": str(settings.generations),
               "passk": run_passk(records, settings.scoring, out, generation)}
    write_json(out / "results.json", results)
    write_reports(out, [out.name], [results], [out])
    return out, results


def report_runs(runs: list[Path], out: Path) -> list[Path]:
    """`wmtp report`: one side-by-side report of several evaluations."""
    found = [find_results(run) for run in runs]
    return write_reports(out, report_names([directory for directory, _ in found]), [results for _, results in found],
                         [d for d, _ in found])


def report_names(directories: list[Path]) -> list[str]:
    """A name per evaluation directory: its training run's name for an `eval-*` directory inside a run, else its
    own name; where two would share a name, each of those gets its own directory name (after its parent's)."""
    names = [d.parent.name if d.name.startswith("eval-") else d.name for d in directories]
    return [f"{d.parent.name}/{d.name}" if names.count(name) > 1 else name
            for d, name in zip(directories, names, strict=True)]
