"""The `wmtp` command. Errors are one line and exit code 1; `--verbose` adds the traceback.

A light door: this module imports neither torch nor transformers, so `--help`, usage errors and config or recipe
errors answer at once; each command imports what it needs when it runs."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import traceback
from dataclasses import replace
from functools import partial
from pathlib import Path

from . import __version__
from .config import ConfigError, dump_masked, load_config, load_recipe, parse_overrides, parse_size
from .evaluate.settings import PROMPT_FORMATS, EvalSettings, ExecuteSettings, Sampling, Scoring, eval_files
from .execution import BENCHMARKS
from .execution.sandbox import Limits
from .runtime.storage import StorageError
from .runtime.tracking import describe_tracking
from .weighting import CommandInputs, SchemeCommand, checked_config, commands, config_section_names, frozen_model


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wmtp", description="Weighted multi-token prediction")
    parser.add_argument("--version", action="version", version=f"wmtp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a model from a config (where/how) and a recipe (what)")
    train.add_argument("--config", required=True, type=Path)
    train.add_argument("--recipe", required=True, type=Path)
    _add_overrides(train)
    train.add_argument("--run-name", help="directory under output_dir (default: <recipe name>-<time>)")
    train.add_argument("--tags", default="", help="comma-separated MLflow tags, e.g. a,b or key=value")
    train.add_argument("--resume", help="a checkpoint directory or URL, or `auto` for the run's latest checkpoint "
                       "(with a remote output_dir: local or remote, whichever is newer)")
    train.add_argument("--dry-run", action="store_true", help="validate everything and print the plan; no training")
    train.add_argument("--verbose", action="store_true", help="print the resolved config and tracebacks")
    train.add_argument("--device-memory", type=_size, help="with --dry-run: say whether the plan fits, e.g. 80GB")
    plan = sub.add_parser("plan", help="memory per rank and FLOPs per token before launch, from the configs alone "
                          "(the model is built on the meta device; nothing is loaded or trained)")
    plan.add_argument("--config", required=True, type=Path)
    plan.add_argument("--recipe", required=True, type=Path)
    _add_overrides(plan)
    plan.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", "1")),
                      help="ranks (GPUs) the run will use (default: $WORLD_SIZE or 1)")
    plan.add_argument("--device-memory", type=_size, help="memory per device, e.g. 80GB: say whether it fits")
    plan.add_argument("--verbose", action="store_true", help="print tracebacks")
    fetch = sub.add_parser("fetch", help="download storage URLs (s3://, gs://, az://, ...) into the local cache "
                           "($WMTP_CACHE) ahead of a run; a cached, unchanged URL is not downloaded again")
    fetch.add_argument("urls", nargs="+")
    fetch.add_argument("--verbose", action="store_true", help="print tracebacks")
    convert = sub.add_parser("convert-meta", help="write Meta's MTP release (params.json, consolidated*.pth, "
                             "tokenizer.model) once as a Hugging Face wmtp model directory")
    convert.add_argument("directory", type=Path, help="Meta's checkpoint directory")
    convert.add_argument("out", type=Path, help="the Hugging Face directory to write")
    convert.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16",
                         help="dtype of the written weights (Meta's release is bfloat16)")
    convert.add_argument("--max-shard-size", type=_size, default=parse_size("5GB"),
                         help="largest safetensors file, e.g. 5GB")
    convert.add_argument("--verbose", action="store_true", help="print tracebacks")
    states = sub.add_parser("cache-states", help="with mtp.trainable: heads, run the frozen trunk once over the "
                            "training and validation sequences and write what the heads read (the config's "
                            "trunk_cache), so training skips the trunk")
    states.add_argument("--config", required=True, type=Path)
    states.add_argument("--recipe", required=True, type=Path)
    _add_overrides(states)
    states.add_argument("--out", type=Path, help="the cache file (default: the config's trunk_cache)")
    states.add_argument("--verbose", action="store_true", help="print tracebacks")
    for command in commands().values():  # a weighting scheme's own commands (Rho-1's score-reference)
        scheme = sub.add_parser(command.name, help=command.help)
        scheme.add_argument("--config", required=True, type=Path)
        scheme.add_argument("--recipe", required=True, type=Path)
        _add_overrides(scheme)
        scheme.add_argument("--verbose", action="store_true", help="print tracebacks")

    evaluate = sub.add_parser("eval", formatter_class=_DefaultsShown,
                              help="generate for code benchmarks, then (opt-in) execute for pass@k; head "
                              "quality and self-speculative decoding statistics; report")
    evaluate.add_argument("--config", type=Path, help="default: the checkpoint's run's config.yaml")
    evaluate.add_argument("--recipe", type=Path, help="its data section gives the held-out text; default: the "
                          "checkpoint's run's recipe.yaml (none: head quality is skipped)")
    evaluate.add_argument("--checkpoint",
                          help="a saved model (final/) or a training checkpoint: a path or a storage URL (s3://...); "
                          "default: the config's model.path as it is (a plain causal LM: head 0 only)")
    evaluate.add_argument("--benchmarks", type=_names, default=["mbpp", "humaneval"],
                          help="comma-separated: mbpp,humaneval,codecontests (MBPP/CodeContests data from the "
                          "config's datasets.mbpp / datasets.codecontests); empty for none")
    evaluate.add_argument("--split", default="test", help="MBPP/CodeContests split")
    evaluate.add_argument("--samples", "--n", dest="n", type=int, default=1,
                          help="samples per problem (under torchrun write --samples: torchrun takes --n for its own)")
    evaluate.add_argument("--temperature", type=float, default=0.0, help="0: greedy (then n must be 1)")
    evaluate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with a temperature)")
    evaluate.add_argument("--max-new-tokens", type=int, default=384, help="tokens generated per sample at most")
    evaluate.add_argument("--batch-size", type=int, default=16,
                          help="sequences per generate call (sorted by prompt length; larger is faster on CPUs in "
                          "bfloat16 and on GPUs)")
    evaluate.add_argument("--prompt-format", choices=list(PROMPT_FORMATS), default="raw",
                          help="raw: the model continues the benchmark prompt; chat: the prompt as a user turn in the "
                          "tokenizer's chat template, the code taken from the reply (for instruct models)")
    evaluate.add_argument("--limit", type=int, help="at most this many problems per benchmark (default: all)")
    evaluate.add_argument("--no-heads", action="store_true", help="skip head quality on held-out text")
    evaluate.add_argument("--head-batches", type=int, help="cap on held-out micro-batches for head quality "
                          "(default: all)")
    evaluate.add_argument("--speculative-prompts", type=int, default=16,
                          help="benchmark prompts decoded self-speculatively for acceptance statistics (0: skip)")
    evaluate.add_argument("--out", type=Path, help="a new directory (default: <run dir>/eval-<time>)")
    evaluate.add_argument("--verbose", action="store_true", help="print tracebacks")
    execute = sub.add_parser("execute", formatter_class=_DefaultsShown,
                             help="judge a generations JSONL file in the sandbox: pass@k with CIs")
    execute.add_argument("generations", type=Path)
    execute.add_argument("--out", type=Path, help="a new directory (default: the evaluation beside the generations "
                         "file, which gains pass@k, if it has none yet; else a new execute-<time> directory in the "
                         "file's directory, or the file's directory itself when it holds no results)")
    execute.add_argument("--verbose", action="store_true", help="print tracebacks")
    for p in (evaluate, execute):
        p.add_argument("--k", type=_ints, default=[1, 10], help="comma-separated k values (k > n is reported missing)")
        p.add_argument("--allow-code-execution", action="store_true",
                       help="run model-written programs (in the sandbox); without it nothing is executed")
        p.add_argument("--isolation", choices=["auto", "bwrap", "unshare", "none"], default="auto",
                       help="sandbox isolation; `none` runs programs unisolated and must be asked for explicitly")
        p.add_argument("--timeout", type=float, default=10.0, help="seconds per program (also its CPU limit)")
        p.add_argument("--memory-mb", type=int, default=2048, help="address-space limit per program")
        p.add_argument("--workers", type=int, default=2, help="programs run in parallel")
        p.add_argument("--seed", type=int, default=0, help="sampling and bootstrap seed")
    report = sub.add_parser("report", formatter_class=_DefaultsShown,
                            help="a side-by-side report (markdown + plots) of evaluations")
    report.add_argument("runs", nargs="+", type=Path, help="evaluation directories or training run directories")
    report.add_argument("--out", type=Path, default=Path("report"), help="where report.md and the plots go")
    report.add_argument("--verbose", action="store_true", help="print tracebacks")
    compare = sub.add_parser("compare", help="training runs grouped over seeds: mean ± std of final metrics, paired "
                             "differences against a baseline with 95%% t intervals, learning curves")
    compare.add_argument("runs", nargs="+", help="run directories, directories of runs, or mlflow:<experiment>")
    compare.add_argument("--group-by", type=_names, default=["algorithm"],
                         help="comma-separated parameters (recipe.* or config.*; `algorithm` = recipe.algorithm) or "
                         "`name` (the run name without its -s<seed> suffix); default: algorithm")
    compare.add_argument("--metric", action="append", help="final metric to compare (repeatable; default val/loss, "
                         "which adds every val/ce_head<h>)")
    compare.add_argument("--baseline", help="the group the others are compared with (default: the one whose label "
                         "holds `baseline`, else the first)")
    compare.add_argument("--out", type=Path, help="write report.md, compare.json and curve_*.png here")
    compare.add_argument("--tracking-uri", help="MLflow store of mlflow:<experiment> sources")
    compare.add_argument("--verbose", action="store_true", help="print tracebacks")
    return parser


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key of the config or the recipe, validated like the files' keys and "
                        "recorded in the run (repeatable): --set train.max_steps=10 --set compute.seed=1; a config "
                        "section's key goes to the config, any other to the recipe (or say config.KEY / recipe.KEY); "
                        "the value is read as YAML")


def load_inputs(args: argparse.Namespace):
    """The config and the recipe of a command, with its `--set` overrides applied and validated (the config's
    scheme-owned keys by their schemes)."""
    config_overrides, recipe_overrides, texts = parse_overrides(getattr(args, "overrides", []), config_section_names())
    config = checked_config(load_config(args.config, config_overrides, texts))
    return config, load_recipe(args.recipe, recipe_overrides, texts)


class _DefaultsShown(argparse.HelpFormatter):
    """Help that gives each option's default as it would be typed (a None or False default is "off": not shown)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        off = any(action.default is value for value in (None, False, argparse.SUPPRESS))  # 0 is a default: not `in`
        if action.option_strings and not off and "(default" not in text:
            shown = ",".join(map(str, action.default)) if isinstance(action.default, list) else "%(default)s"
            text += f" (default: {shown})"
        return text


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ints(text: str) -> list[int]:
    try:
        values = [int(t) for t in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got `{text}`") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got `{text}`")
    return values


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _tags(text: str) -> dict[str, str]:
    tags = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, _, value = item.partition("=")
        tags[key] = value or "true"
    return tags


def _summary(result: dict, run_dir: Path, run_url: str | None = None) -> str:
    lines = [f"run {run_dir}: {result['status'].lower()} at step {result['step']}/{result['total_steps']} "
             f"({result['reason']})"]
    if run_url:
        lines.append(f"uploaded to {run_url} (checkpoints/ and final/, each complete with its _COMPLETE.json)")
    ev = result["eval"]
    if "val/loss" in ev:
        initial = ev.get("initial_val_loss")
        at = f" at step {result['eval_step']}" if result.get("eval_step") is not None else ""
        lines.append(f"validation{at}: loss {ev['val/loss']:.4f}" + (f" (initial {initial:.4f})" if initial else ""))
        lines.append("head  CE      ppl       top-1 acc")
        for h in range(result.get("n_heads", 0)):
            if f"val/ce_head{h}" in ev:
                lines.append(f"{h:<5} {ev[f'val/ce_head{h}']:<7.4f} {ev[f'val/ppl_head{h}']:<9.2f} "
                             f"{ev[f'val/acc_head{h}']:.4f}")
            else:  # no valid pair of this head in the validation sequences: nothing was measured
                lines.append(f"{h:<5} -       -         -        (no target in the validation data)")
        if result.get("n_heads", 0) > 1:
            lines.append(acceptance_line([ev.get(f"val/acceptance_head{k}") for k in range(1, result["n_heads"])],
                                         ev.get("val/tokens_per_forward")))
    lines.append(f"checkpoint: {result['checkpoint']}")
    if result["final_model"]:
        lines.append(f"final model: {result['final_model']}")
    if result["mlflow_run_id"]:
        lines.append(f"MLflow run {result['mlflow_run_id']} in {result['tracking_uri']} "
                     f"(mlflow ui --backend-store-uri {result['tracking_uri']})")
    if result.get("tensorboard_dir"):
        lines.append(f"TensorBoard: tensorboard --logdir {result['tensorboard_dir']}")
    return "\n".join(lines)


def acceptance_line(rates: list[float | None], tokens: float | None) -> str:
    """The teacher-forced acceptance per depth and the expected tokens per forward, `-` where not measured."""
    cells = ", ".join(f"{k} {'-' if a is None else f'{a:.3f}'}" for k, a in enumerate(rates, start=1))
    return (f"acceptance against head 0 (teacher-forced), by depth: {cells}; expected tokens per forward "
            + ("-" if tokens is None else f"{tokens:.3f}"))


def train_command(args: argparse.Namespace) -> int:
    config, recipe = load_inputs(args)
    from .weighting import scheme_settings

    scheme_settings(recipe)  # the scheme's own sections, checked before the heavy imports below
    if args.verbose:
        print(f"# config {args.config}\n{dump_masked(config)}# recipe {args.recipe}\n{dump_masked(recipe)}")
    if args.resume == "auto" and not args.run_name:
        raise ConfigError("--resume auto needs --run-name (the run whose latest checkpoint to continue)")
    run_dir, run_url = _run_location(config, args)

    from .components.checkpoint import TOKENIZER_DIR, checkpoint_step
    from .components.checkpointer import find_resume
    from .runtime import distributed as dist_utils
    from .runtime.mirror import RunMirror, check_writable, remote_run_exists
    from .training.build import describe_run, dry_run_report, prepare
    from .training.trainer import Trainer

    info = dist_utils.init_distributed(config.compute.device, config.compute.timeout_minutes)
    try:
        if run_url is not None and info.is_main:
            check_writable(run_url)
        resume = find_resume(args.resume, run_dir, info, run_url)
        if resume is None and args.resume is None and info.is_main and (
                (run_dir.is_dir() and any(run_dir.iterdir())) or (run_url and remote_run_exists(run_url))):
            raise ConfigError(f"{run_url or run_dir} already holds a run: pass --resume auto to continue it or "
                              "another --run-name")
        would = "would resume" if args.dry_run else "resuming"
        start = (f"{would} from {resume} (step {checkpoint_step(resume)})" if resume is not None else
                 f"no checkpoint of {run_url or run_dir} found: {'would start' if args.dry_run else 'starting'} at "
                 "step 0" if args.resume == "auto" else None)
        setup = prepare(config, recipe, info, tokenizer_dir=resume / TOKENIZER_DIR if resume else None)
        tracking = describe_tracking(config, run_dir)
        where = f"{run_url} (written first to {run_dir})" if run_url else str(run_dir)
        if args.dry_run:
            report = dry_run_report(setup)
            if info.is_main:
                print(describe_run(setup, where, tracking, report))
                print(_memory_lines(config, recipe, info.world_size, args.device_memory, len(setup.tokenizer)))
                print("\n".join(filter(None, [start, "dry run: configuration, data, tokenizer, model and weighting "
                                               "are valid; nothing was trained or written"])))
            return 0
        if info.is_main:
            print("\n".join(filter(None, [describe_run(setup, where, tracking), start])), flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        storage = config.storage
        mirror = None if run_url is None else RunMirror(
            run_dir, run_url, rank=info.rank, world_size=info.world_size, keep_last=config.checkpoint.keep_last,
            retries=storage.upload_retries, backoff_seconds=storage.retry_backoff_seconds,
            wait_seconds=config.compute.timeout_minutes * 60)
        trainer = Trainer(setup, run_dir, run_name=run_dir.name, tags=_tags(args.tags), resume=resume,
                          config_files=(args.config, args.recipe), mirror=mirror)
        result = trainer.run()
        dist_utils.finish_together(info)  # the summary says every rank is done (tests/helpers/torchrun.py)
        if info.is_main:
            print(_summary(result, run_dir, run_url))
        return 0
    finally:
        dist_utils.shutdown()


def _run_location(config, args: argparse.Namespace) -> tuple[Path, str | None]:
    """The local run directory and, for a remote output_dir (or a remote --resume checkpoint), the run's URL."""
    from .runtime.mirror import staging_dir
    from .runtime.storage import is_remote

    staging = config.storage.staging_dir
    if args.resume and args.resume != "auto":
        if is_remote(args.resume):  # <output_dir>/<run>/checkpoints/step-N
            run_url = args.resume.rstrip("/").rsplit("/", 2)[0]
            output_dir, name = run_url.rsplit("/", 1)
            return staging_dir(output_dir, staging) / name, run_url
        run_dir = Path(args.resume).resolve().parent.parent
        return run_dir, (f"{config.output_dir.rstrip('/')}/{run_dir.name}" if is_remote(config.output_dir) and
                         run_dir.parent == staging_dir(config.output_dir, staging).resolve() else None)
    name = args.run_name or f"{args.recipe.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if is_remote(config.output_dir):
        return staging_dir(config.output_dir, staging) / name, f"{config.output_dir.rstrip('/')}/{name}"
    return Path(config.output_dir) / name, None


def _memory_lines(config, recipe, world_size: int, device_memory: int | None, vocab_size: int | None) -> str:
    from .model.memory import memory_plan

    plan, flops = memory_plan(config, recipe, world_size, vocab_size, reference=frozen_model(config))
    ranks = f"{world_size} {'rank' if world_size == 1 else 'ranks'}"
    return "\n".join([f"memory per rank ({ranks}, {config.compute.distributed}, {plan.params_total / 1e6:.1f}M "
                      f"parameters, {plan.blocks} blocks):",
                      plan.table(device_memory),
                      f"training FLOPs per token: {flops / 1e9:.3f} GFLOP (6 x parameters + attention)"])


def plan_command(args: argparse.Namespace) -> int:
    config, recipe = load_inputs(args)
    from .weighting import scheme_settings

    scheme_settings(recipe)
    if args.world_size < 1:
        raise ConfigError(f"--world-size: expected at least 1, got {args.world_size}")
    print(_memory_lines(config, recipe, args.world_size, args.device_memory, None))
    return 0


def fetch_command(args: argparse.Namespace) -> int:
    from .runtime.storage import fetch, is_remote

    for url in args.urls:
        if not is_remote(url):
            raise ConfigError(f"{url}: not a storage URL (expected e.g. s3://bucket/key)")
        started = time.monotonic()
        print(f"{url} -> {fetch(url, 'fetch')} ({time.monotonic() - started:.1f}s)")
    return 0


def convert_meta_command(args: argparse.Namespace) -> int:
    from .model.meta import convert_sentencepiece, is_meta_checkpoint, load_meta_mtp_checkpoint
    from .runtime.precision import DTYPES

    if not is_meta_checkpoint(args.directory):
        raise ConfigError(f"{args.directory}: not Meta's checkpoint layout (no params.json)")
    started = time.monotonic()
    model = load_meta_mtp_checkpoint(args.directory, dtype=DTYPES[args.dtype])
    tokenizer = (convert_sentencepiece(args.directory / "tokenizer.model")
                 if (args.directory / "tokenizer.model").is_file() else None)
    model.save_pretrained(args.out, tokenizer=tokenizer, max_shard_size=args.max_shard_size)
    print(f"wrote {args.out}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {model.n_heads} "
          f"heads, {args.dtype}" + ("" if tokenizer else ", no tokenizer.model found (none written)")
          + f" in {time.monotonic() - started:.1f}s")
    return 0


def cache_states_command(args: argparse.Namespace) -> int:
    """Build the run's data and model as training does and write the trunk-state cache."""
    config, recipe = load_inputs(args)
    from .training.build import load_run_data
    from .training.trunk_cache import cache_states, cache_target, model_for_cache

    cache_target(config, recipe, args.out)  # before the data and the model are built
    data = load_run_data(config, recipe)
    cache_states(config, recipe, data, model_for_cache(config, recipe, data.tokenizer), args.out)
    return 0


def scheme_command(command: SchemeCommand, args: argparse.Namespace) -> int:
    """Run a weighting scheme's command on the validated config and recipe; the data is read when it asks."""
    config, recipe = load_inputs(args)

    def load_data():
        from .training.build import load_run_data

        return load_run_data(config, recipe)

    return command.run(CommandInputs(config, recipe, load_data))


def _passk_lines(results: dict) -> list[str]:
    from .evaluate.report import pass_cell

    lines = []
    passk = results.get("passk", {})
    for benchmark, entry in passk.get("benchmarks", {}).items():
        cells = [f"{name} missing (k > n)" if value is None else f"{name} {pass_cell(value)}"
                 for name, value in entry["pass@k"].items()]
        lines.append(f"{benchmark}: {entry['problems']} problems, n={entry['n']}: " + ", ".join(cells))
    if passk.get("benchmarks"):
        lines.append("(pass@k in %, [95% bootstrap interval over problems], W[95% Wilson score interval])")
    if passk.get("note"):
        ks = ",".join(map(str, passk.get("ks", [])))
        lines.append(f"pass@k: {passk['note']}; run `wmtp execute {shlex.quote(str(results.get('generations')))} "
                     f"--allow-code-execution --k {ks}` to add it to this evaluation")
    return lines


def _scoring(args: argparse.Namespace) -> Scoring:
    limits = Limits(timeout_s=args.timeout, cpu_s=max(1, int(args.timeout)), memory_mb=args.memory_mb)
    return Scoring(allow_code_execution=args.allow_code_execution, isolation=args.isolation, limits=limits,
                   workers=args.workers, ks=tuple(args.k), seed=args.seed)


def eval_settings(args: argparse.Namespace) -> EvalSettings:
    """The typed settings of `wmtp eval` from its command line (usage errors are one line, before any import)."""
    unknown = set(args.benchmarks) - set(BENCHMARKS)
    if unknown:
        raise ConfigError(f"--benchmarks: unknown {', '.join(sorted(unknown))} (choose from {', '.join(BENCHMARKS)})")
    try:
        sampling = Sampling(n=args.n, temperature=args.temperature, top_p=args.top_p,
                            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
                            prompt_format=args.prompt_format)
    except ValueError as exc:
        raise ConfigError(f"--n/--temperature/--top-p/--prompt-format: {exc}") from None
    return EvalSettings(checkpoint=args.checkpoint, benchmarks=tuple(args.benchmarks), split=args.split,
                        limit=args.limit, sampling=sampling, scoring=_scoring(args),
                        heads_skipped="--no-heads" if args.no_heads else None, head_batches=args.head_batches,
                        speculative_prompts=args.speculative_prompts, out=args.out)


def eval_command(args: argparse.Namespace) -> int:
    settings = eval_settings(args)
    config_path, recipe_path = eval_files(args.config, args.recipe, args.checkpoint)
    config = checked_config(load_config(config_path))
    recipe = None if recipe_path is None else load_recipe(recipe_path)
    if recipe is None and settings.heads_skipped is None:
        settings = replace(settings, heads_skipped="no --recipe and no recipe.yaml in the checkpoint's run (the "
                           "held-out text comes from a recipe's data)")
    if (config_path, recipe_path) != (args.config, args.recipe):
        print(f"config {config_path}, recipe {recipe_path or 'none'} (the checkpoint's run's own)", flush=True)

    from .evaluate.checkpoint_eval import evaluate_checkpoint

    out, results = evaluate_checkpoint(config, recipe, settings)
    if not results:  # another rank of a torchrun job: rank 0 reports
        return 0
    lines = _passk_lines(results)
    generation = results.get("passk", {}).get("generation", {})
    if generation.get("tokens_per_second"):
        lines.append(f"generation: {generation['generated_tokens']} tokens in {generation['seconds']} s "
                     f"({generation['tokens_per_second']} tokens/s, {generation['processes']} process(es))")
    if results.get("heads_skipped"):
        lines.append(f"head quality skipped: {results['heads_skipped']}")
    for head in (results.get("heads") or {}).get("heads", []):
        if head["ce"] is not None:
            lines.append(f"head {head['head']}: CE {head['ce']:.4f}, ppl {head['ppl']:.2f}, top-1 {head['acc']:.4f}")
    acceptance = (results.get("heads") or {}).get("acceptance")
    if acceptance and acceptance["depths"]:
        lines.append(acceptance_line([d["rate"] for d in acceptance["depths"]], acceptance["tokens_per_forward"]))
    spec = results.get("speculative")
    if spec and spec["mean_accepted_length"] is not None:
        lines.append(f"self-speculative: mean accepted length {spec['mean_accepted_length']:.3f} tokens per forward")
    print("\n".join(lines + [f"results: {out / 'results.json'}, report: {out / 'report.md'}"]))
    return 0


def execute_command(args: argparse.Namespace) -> int:
    if not args.allow_code_execution:
        raise ConfigError("wmtp execute runs model-written programs: pass --allow-code-execution to allow it")
    settings = ExecuteSettings(generations=args.generations, scoring=_scoring(args), out=args.out)

    from .evaluate.checkpoint_eval import execute_generations

    out, results, note = execute_generations(settings)
    print("\n".join(_passk_lines(results) + ([note] if note else [])
                    + [f"results: {out / 'results.json'}, report: {out / 'report.md'}"]))
    return 0


def report_command(args: argparse.Namespace) -> int:
    from .evaluate.checkpoint_eval import report_runs

    files = report_runs(args.runs, args.out)
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def compare_command(args: argparse.Namespace) -> int:
    from .evaluate.compare import run_compare

    _, report = run_compare(args.runs, group_by=args.group_by, metrics=args.metric or ["val/loss"],
                            baseline=args.baseline, out=args.out, tracking_uri=args.tracking_uri)
    print(report)
    if args.out is not None:
        print(f"wrote {args.out / 'report.md'}, {args.out / 'compare.json'} and the learning curves")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    handlers = {"train": train_command, "plan": plan_command, "fetch": fetch_command,
                "convert-meta": convert_meta_command, "eval": eval_command, "execute": execute_command,
                "report": report_command, "compare": compare_command, "cache-states": cache_states_command,
                **{name: partial(scheme_command, command) for name, command in commands().items()}}
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print("wmtp: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the one place errors become a line and an exit code
        if getattr(args, "verbose", False):
            traceback.print_exc()
        message = str(exc).splitlines()[0] if str(exc) else ""
        if not isinstance(exc, ConfigError | OSError | StorageError):  # an unexpected error: name its kind
            message = f"{type(exc).__name__}: {message}"
        print(f"wmtp: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
