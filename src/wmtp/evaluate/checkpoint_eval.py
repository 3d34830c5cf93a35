"""`wmtp eval`, `wmtp execute` and `wmtp report`: evaluate a checkpoint end to end.

Order (nothing runs model-written code before its generations are on disk):
1. load the checkpoint (a saved model directory or a training checkpoint) and its tokenizer;
2. generate completions for each benchmark and write generations.jsonl;
3. only with --allow-code-execution: judge every sample in the sandbox (executions.jsonl), pass@k with CIs;
4. head quality on the recipe's held-out data; self-speculative decoding statistics on benchmark prompts;
5. results.json, report.md with plots, and an MLflow run with the settings, the metrics and these files.

`wmtp execute` on the generations of an evaluation that has no pass@k yet (the hint `wmtp eval` prints) adds
pass@k to that evaluation: its results.json, report.md and MLflow run. Otherwise it writes a directory of its
own: no command overwrites what another wrote.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoTokenizer

from ..components.checkpoint import STATE_FILE, TOKENIZER_DIR, load_checkpoint_model
from ..components.validate import acceptance_metrics, head_quality
from ..config import Config, ConfigError, Recipe
from ..data.sequences import recipe_sequences
from ..data.sources import load_examples
from ..execution.problems import Problem, load_problems
from ..execution.samples import execute, read_generations
from ..execution.sandbox import Sandbox
from ..model.build import load_model_as_is, load_tokenizer_from, secret
from ..model.mtp import HEADS_FILE, MTPModel
from ..runtime.atomic import atomic_file
from ..runtime.distributed import DistInfo, broadcast_object, init_distributed, shutdown
from ..runtime.mirror import local_output_dir
from ..runtime.precision import DTYPES, autocast_for
from ..runtime.storage import local_path
from ..runtime.tracking import TENSORBOARD_DIR, Tracker, append_scalars, check_backends, quiet_library_progress
from .generation import generate_samples, raw_inputs
from .passk import summarize
from .report import find_results, write_json, write_reports
from .settings import EvalSettings, ExecuteSettings, Scoring

RESULTS = "results.json"  # an evaluation directory's record; `wmtp report` reads it


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


def evaluate_checkpoint(config: Config, recipe: Recipe | None, settings: EvalSettings) -> tuple[Path, dict]:
    """Evaluate; under torchrun every rank generates its share of the batches and rank 0 does the rest (returns
    (out, {}) on the other ranks). Without a recipe, head quality (on its held-out data) is not measured."""
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


def _evaluate(config: Config, recipe: Recipe | None, settings: EvalSettings, info: DistInfo) -> tuple[Path, dict]:
    check_backends(config)
    if not config.logging.progress or not info.is_main or not sys.stderr.isatty():
        quiet_library_progress()
    device = info.device
    model, tokenizer, run_dir = load_for_evaluation(config, settings)
    model = model.to(device).eval()
    tokenizer.padding_side = "left"
    autocast = autocast_for(device, config.compute.precision)
    name = settings.checkpoint or f"{config.model.path} (as is)"
    default_out = run_dir / f"eval-{'' if settings.checkpoint else 'base-'}{time.strftime('%Y%m%d-%H%M%S')}"
    out = (settings.out or broadcast_object(default_out, info)).resolve()
    if info.is_main:
        if (out / RESULTS).exists():
            raise ConfigError(f"--out {out} already holds {RESULTS} (another evaluation): choose a new directory")
        out.mkdir(parents=True, exist_ok=True)
    results: dict = {"checkpoint": str(name), "run_name": run_dir.name if settings.checkpoint else
                     f"{Path(str(config.model.path)).name} (as is)", "run_dir": str(run_dir.resolve()),
                     "device": str(device), "precision": config.compute.precision,
                     "dtype": str(model.unembedding.weight.dtype).removeprefix("torch."),
                     "processes": info.world_size}

    problems = []
    for benchmark in settings.benchmarks:
        problems += load_problems(benchmark, config.datasets.get(benchmark), split=settings.split,
                                  limit=settings.limit)
    if problems:
        sampling = settings.sampling
        if info.is_main:
            print(plan_line(settings, problems), flush=True)
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
    heads = None if settings.heads_skipped else held_out_head_quality(model, tokenizer, config, recipe, device,
                                                                      autocast, settings.head_batches)
    if heads is None:
        results["heads_skipped"] = settings.heads_skipped or "the recipe's data holds no held-out examples"
    else:
        results["heads"] = heads
    if model.n_heads > 1 and problems and settings.speculative_prompts > 0:
        results["speculative"] = speculative_statistics(model, tokenizer, problems[:settings.speculative_prompts],
                                                        settings.sampling.max_new_tokens, device, autocast)
    write_evaluation(out, results, open_eval_run(config, settings, results, out))
    return out, results


def plan_line(settings: EvalSettings, problems: list[Problem]) -> str:
    """What is about to be generated, in one line: benchmarks and their problems, samples, decoding, length."""
    counts = Counter(p.benchmark for p in problems)
    s = settings.sampling
    decoding = "greedy" if s.temperature == 0 else f"temperature {s.temperature}, top-p {s.top_p}"
    return ("generating for " + ", ".join(f"{b} ({counts[b]} problem{'s' * (counts[b] != 1)})"
                                          for b in settings.benchmarks if counts[b])
            + f": {s.n} sample{'s' * (s.n != 1)} per problem, {decoding}, at most {s.max_new_tokens} new tokens, "
            f"prompt format {s.prompt_format}")


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
    metrics.update(acceptance_metrics((results.get("heads") or {}).get("acceptance"), "eval"))
    spec = results.get("speculative") or {}
    if spec.get("mean_accepted_length") is not None:
        metrics["eval/spec_mean_accepted_length"] = spec["mean_accepted_length"]
    return metrics


def eval_params(config: Config, settings: EvalSettings) -> dict[str, str]:
    """The settings of an evaluation as MLflow params (what was generated, how, from which model)."""
    s = settings.sampling
    return {"checkpoint": settings.checkpoint or f"{config.model.path} (as is)",
            "benchmarks": ",".join(settings.benchmarks), "split": settings.split,
            "limit": "all" if settings.limit is None else str(settings.limit), "samples": str(s.n),
            "temperature": str(s.temperature), "top_p": str(s.top_p), "max_new_tokens": str(s.max_new_tokens),
            "batch_size": str(s.batch_size), "prompt_format": s.prompt_format, "seed": str(s.seed),
            "k": ",".join(map(str, settings.scoring.ks)),
            "allow_code_execution": str(settings.scoring.allow_code_execution)}


def open_eval_run(config: Config, settings: EvalSettings, results: dict, out: Path) -> Tracker:
    """The evaluation's MLflow run, in the store beside the training runs (a remote output_dir's staging
    directory), named `<run name>/<eval dir>`, with the settings as params; `results` gain its id and store so
    that `wmtp execute` can add pass@k to it later. With the tensorboard backend, its metrics go to
    `<out>/tensorboard` too."""
    tracker = Tracker(config.mlflow, local_output_dir(config.output_dir, config.storage.staging_dir),
                      f"{results['run_name']}/{out.name}", active=True, backends=config.tracking.backends,
                      tags={"kind": "evaluation", "checkpoint": results["checkpoint"]},
                      tensorboard_dir=out / TENSORBOARD_DIR)
    tracker.log_params(eval_params(config, settings))
    results["mlflow_run_id"], results["tracking_uri"] = tracker.run_id, tracker.tracking_uri
    return tracker


def write_evaluation(out: Path, results: dict, tracker: Tracker) -> None:
    """results.json, report.md and plots, and the metrics and files in the evaluation's MLflow run."""
    status = "FAILED"
    try:
        write_json(out / RESULTS, results)
        files = write_reports(out, report_names([out], [results]), [results], [Path(results["run_dir"])])
        tracker.log_metrics(flat_metrics(results), step=0)
        for path in [out / RESULTS, *files, *_written_records(out)]:
            tracker.log_artifact(path, "evaluation")
        status = "FINISHED"
    finally:
        tracker.end(status)


def _written_records(out: Path) -> list[Path]:
    return [p for p in (out / "generations.jsonl", out / "executions.jsonl") if p.is_file()]


def execute_generations(settings: ExecuteSettings) -> tuple[Path, dict, str]:
    """`wmtp execute`: judge a generations file. Returns (directory written, its results, a sentence on what
    happened to the evaluation beside the file, or "")."""
    records = read_generations(settings.generations)
    out, evaluation, note = execute_target(settings.generations, settings.out)
    if evaluation is not None:
        return out, add_passk(out, evaluation, records, settings.scoring), note
    out.mkdir(parents=True, exist_ok=True)
    beside = settings.generations.parent / RESULTS
    run_name = json.loads(beside.read_text()).get("run_name") if beside.is_file() else None
    results = {"generations": str(settings.generations.resolve()), **({"run_name": run_name} if run_name else {}),
               "passk": run_passk(records, settings.scoring, out, records[0].get("generation", {}))}
    write_json(out / RESULTS, results)
    write_reports(out, report_names([out], [results]), [results], [out])
    return out, results, note


def execute_target(generations: Path, out: Path | None) -> tuple[Path, dict | None, str]:
    """Where `wmtp execute` writes: (directory, the evaluation it adds pass@k to or None, a note). An unscored
    evaluation beside the generations is added to; one already scored, or a previous execute's results, get a
    new `execute-<time>` directory inside; an --out elsewhere is used when it holds no results yet."""
    beside = generations.parent
    if out is not None and out.resolve() != beside.resolve():
        if (out / RESULTS).exists():
            raise ConfigError(f"--out {out} already holds {RESULTS}: choose a new directory (nothing is overwritten)")
        return out, None, ""
    if not (beside / RESULTS).is_file():
        return beside, None, ""
    existing = json.loads((beside / RESULTS).read_text())
    if "checkpoint" in existing and Path(existing.get("generations", "")).name == generations.name \
            and not existing.get("passk", {}).get("benchmarks"):
        return beside, existing, f"added pass@k to the evaluation in {beside.resolve()}"
    own = beside / f"execute-{time.strftime('%Y%m%d-%H%M%S')}"
    if own.exists():
        raise ConfigError(f"{own} exists already (an execute this second): run it again")
    return own, None, f"{beside / RESULTS} already holds pass@k and is left as it is"


def add_passk(out: Path, results: dict, records: list[dict], scoring: Scoring) -> dict:
    """Score an evaluation's generations into that evaluation: its results.json (every other key kept), report.md
    (all its sections), its MLflow run and its TensorBoard directory, where it has them."""
    generation = results.get("passk", {}).get("generation") or records[0].get("generation", {})
    results = {**results, "passk": run_passk(records, scoring, out, generation)}
    write_json(out / RESULTS, results)
    files = write_reports(out, report_names([out], [results]), [results], [Path(results.get("run_dir", out))])
    if results.get("mlflow_run_id"):
        log_to_eval_run(results, [out / RESULTS, *files, *_written_records(out)])
    if (out / TENSORBOARD_DIR).is_dir():
        append_scalars(out / TENSORBOARD_DIR, flat_metrics({"passk": results["passk"]}), step=0)
    return results


def log_to_eval_run(results: dict, files: list[Path]) -> None:
    """The pass@k metrics and the rewritten files into the evaluation's MLflow run (which `wmtp eval` ended)."""
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(results["tracking_uri"])
    now = int(time.time() * 1000)
    passk = flat_metrics({"passk": results["passk"]})
    try:
        client.log_batch(results["mlflow_run_id"], metrics=[Metric(k, v, now, 0) for k, v in passk.items()])
        for path in files:
            client.log_artifact(results["mlflow_run_id"], str(path), "evaluation")
    except MlflowException as exc:  # the store moved or was lost: the files hold the results, say so
        print(f"MLflow run {results['mlflow_run_id']} in {results['tracking_uri']} not updated ({exc.message}); "
              "the pass@k is in results.json", file=sys.stderr)


def report_runs(runs: list[Path], out: Path) -> list[Path]:
    """`wmtp report`: one side-by-side report of several evaluations."""
    found = [find_results(run) for run in runs]
    return write_reports(out, report_names([d for d, _ in found], [results for _, results in found]),
                         [results for _, results in found], [d for d, _ in found])


def report_names(directories: list[Path], results: list[dict] | None = None) -> list[str]:
    """A label per evaluation: its training run's name (recorded by `wmtp eval`; for older results, the parent of
    an `eval-*` directory), else its directory's name. Where two would share a label, each of those becomes
    `<label>/<its directory>`, and its path where even that is shared."""
    recorded = [r.get("run_name") for r in results] if results else [None] * len(directories)
    names = [run or (d.parent.name if d.name.startswith("eval-") else d.name)
             for d, run in zip(directories, recorded, strict=True)]
    names = [f"{name}/{d.name}" if names.count(name) > 1 else name for d, name in zip(directories, names, strict=True)]
    return [str(d) if names.count(name) > 1 else name for d, name in zip(directories, names, strict=True)]
