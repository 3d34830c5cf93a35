"""The `wmtp` command. Errors are one line and exit code 1; `--verbose` adds the traceback."""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

from .config import ConfigError, dump_masked, load_config, load_recipe
from .tracking import tracking_uri


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wmtp", description="Weighted multi-token prediction")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a model from a config (where/how) and a recipe (what)")
    train.add_argument("--config", required=True, type=Path)
    train.add_argument("--recipe", required=True, type=Path)
    train.add_argument("--run-name", help="directory under output_dir (default: <recipe name>-<time>)")
    train.add_argument("--tags", default="", help="comma-separated MLflow tags, e.g. a,b or key=value")
    train.add_argument("--resume", help="a checkpoint directory, or `auto` for the run's latest checkpoint")
    train.add_argument("--dry-run", action="store_true", help="validate everything and print the plan; no training")
    train.add_argument("--verbose", action="store_true", help="print the resolved config and tracebacks")
    score = sub.add_parser("score-reference", help="Rho-1: score the training set with the reference model once "
                           "and write the config's reference_cache")
    score.add_argument("--config", required=True, type=Path)
    score.add_argument("--recipe", required=True, type=Path)
    score.add_argument("--verbose", action="store_true", help="print tracebacks")

    evaluate = sub.add_parser("eval", help="generate for code benchmarks, then (opt-in) execute for pass@k; head "
                              "quality and self-speculative decoding statistics; report")
    evaluate.add_argument("--config", required=True, type=Path)
    evaluate.add_argument("--recipe", required=True, type=Path, help="its data section gives the held-out text")
    evaluate.add_argument("--checkpoint", required=True, type=Path, help="a saved model (final/) or a checkpoint")
    evaluate.add_argument("--benchmarks", type=_names, default=["mbpp", "humaneval"],
                          help="comma-separated: mbpp,humaneval,codecontests (MBPP/CodeContests data from the "
                          "config's datasets.mbpp / datasets.codecontests); empty for none")
    evaluate.add_argument("--split", default="test", help="MBPP/CodeContests split (default test)")
    evaluate.add_argument("--n", type=int, default=1, help="samples per problem")
    evaluate.add_argument("--temperature", type=float, default=0.0, help="0: greedy (then n must be 1)")
    evaluate.add_argument("--top-p", type=float, default=1.0)
    evaluate.add_argument("--max-new-tokens", type=int, default=384)
    evaluate.add_argument("--batch-size", type=int, default=8, help="sequences per generate call")
    evaluate.add_argument("--limit", type=int, help="at most this many problems per benchmark")
    evaluate.add_argument("--no-heads", action="store_true", help="skip head quality on held-out text")
    evaluate.add_argument("--head-batches", type=int, help="cap on held-out micro-batches for head quality")
    evaluate.add_argument("--speculative-prompts", type=int, default=16,
                          help="benchmark prompts decoded self-speculatively for acceptance statistics (0: skip)")
    evaluate.add_argument("--out", type=Path, help="default: <run dir>/eval-<time>")
    evaluate.add_argument("--verbose", action="store_true", help="print tracebacks")
    execute = sub.add_parser("execute", help="judge a generations JSONL file in the sandbox: pass@k with CIs")
    execute.add_argument("generations", type=Path)
    execute.add_argument("--out", type=Path, help="default: the generations file's directory")
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
    report = sub.add_parser("report", help="a side-by-side report (markdown + plots) of evaluations")
    report.add_argument("runs", nargs="+", type=Path, help="evaluation directories or training run directories")
    report.add_argument("--out", type=Path, default=Path("report"))
    report.add_argument("--verbose", action="store_true", help="print tracebacks")
    return parser


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


def _tags(text: str) -> dict[str, str]:
    tags = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, _, value = item.partition("=")
        tags[key] = value or "true"
    return tags


def _plan(setup, trainer_steps: tuple[int, int], run_dir: Path, loss: float, head_ce: list[float]) -> str:
    model, recipe, info = setup.model, setup.recipe, setup.info
    total = sum(p.numel() for p in model.parameters())
    heads = sum(p.numel() for p in model.heads.parameters())
    t = recipe.train
    tokens = t.micro_batch_size * t.grad_accum_steps * info.world_size * recipe.data.max_length
    steps, per_epoch = trainer_steps
    return "\n".join([
        f"model: {total / 1e6:.2f}M parameters ({heads / 1e6:.2f}M in {model.n_heads - 1} extra "
        f"{model.mtp_config.head_type} heads), {model.n_heads} heads, vocabulary {model.unembedding.weight.shape[0]}",
        f"data: {setup.n_train_examples} train / {setup.n_val_examples} validation examples -> "
        f"{len(setup.train_set)} train / {len(setup.val_set) if setup.val_set else 0} validation sequences "
        f"of {recipe.data.max_length} tokens",
        f"steps: {steps} optimizer steps ({per_epoch} per epoch), {tokens} tokens per step "
        f"({t.micro_batch_size} x {t.grad_accum_steps} accumulation x {info.world_size} processes)",
        f"device: {info.device}, precision {setup.config.compute.precision}, world size {info.world_size}",
        f"one forward on one batch: loss {loss:.4f}; CE per head " + " ".join(f"{c:.3f}" for c in head_ce),
        f"outputs: {run_dir} (checkpoints/, final/); MLflow: "
        + (tracking_uri(setup.config.mlflow, Path(setup.config.output_dir)) if setup.config.mlflow.enabled
           else "disabled"),
    ])


def _summary(result: dict, run_dir: Path) -> str:
    lines = [f"run {run_dir}: {result['status'].lower()} at step {result['step']}/{result['total_steps']} "
             f"({result['reason']})"]
    ev = result["eval"]
    if "val/loss" in ev:
        initial = ev.get("initial_val_loss")
        lines.append(f"validation loss {ev['val/loss']:.4f}" + (f" (initial {initial:.4f})" if initial else ""))
        lines.append("head  CE      ppl       top-1 acc")
        h = 0
        while f"val/ce_head{h}" in ev:
            lines.append(f"{h:<5} {ev[f'val/ce_head{h}']:<7.4f} {ev[f'val/ppl_head{h}']:<9.2f} "
                         f"{ev[f'val/acc_head{h}']:.4f}")
            h += 1
    lines.append(f"checkpoint: {result['checkpoint']}")
    if result["final_model"]:
        lines.append(f"final model: {result['final_model']}")
    if result["mlflow_run_id"]:
        lines.append(f"MLflow run {result['mlflow_run_id']} in {result['tracking_uri']} "
                     f"(mlflow ui --backend-store-uri {result['tracking_uri']})")
    return "\n".join(lines)


def train_command(args: argparse.Namespace) -> int:
    import torch

    from . import distributed as dist_utils
    from .train import Trainer, find_resume, labels_for, per_head_sums, prepare, step_counts

    config = load_config(args.config)
    recipe = load_recipe(args.recipe)
    if args.verbose:
        print(f"# config {args.config}\n{dump_masked(config)}# recipe {args.recipe}\n{dump_masked(recipe)}")
    if args.resume == "auto" and not args.run_name:
        raise ConfigError("--resume auto needs --run-name (the run whose latest checkpoint to continue)")
    if args.resume and args.resume != "auto":
        run_dir = Path(args.resume).resolve().parent.parent
    else:
        run_dir = Path(config.output_dir) / (args.run_name or f"{args.recipe.stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    resume = find_resume(args.resume, run_dir)
    if resume is None and not args.dry_run and ((run_dir / "checkpoints").exists() or (run_dir / "critic").exists()):
        raise ConfigError(f"{run_dir} already holds a run: pass --resume auto to continue it or another --run-name")
    info = dist_utils.init_distributed(config.compute.device)
    try:
        setup = prepare(config, recipe, info, tokenizer_dir=resume / "model" if resume else None)
        if args.dry_run:
            steps = step_counts(len(setup.train_set), recipe.train, info.world_size)
            batch = setup.train_set.select(torch.arange(min(recipe.train.micro_batch_size, len(setup.train_set))))
            batch = {k: v.to(info.device) for k, v in batch.items()}
            labels = labels_for(batch, setup.model.n_heads, recipe.data.mask_prompt)
            with torch.no_grad():
                out = setup.model(batch["input_ids"], batch["attention_mask"], labels=labels,
                                  chunk_size=recipe.loss.chunk_size)
            sums = per_head_sums(out.ce, out.correct, labels).view(3, -1)
            head_ce = (sums[0] / sums[2].clamp_min(1)).tolist()
            if info.is_main:
                print(_plan(setup, steps, run_dir, float(out.loss), head_ce))
                print("dry run: configuration, data, tokenizer and model are valid; nothing was trained or written")
            return 0
        if info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        trainer = Trainer(setup, run_dir, run_name=run_dir.name, tags=_tags(args.tags), resume=resume,
                          config_files=(args.config, args.recipe))
        result = trainer.run()
        if info.is_main:
            print(_summary(result, run_dir))
        return 0
    finally:
        dist_utils.shutdown()


def score_reference_command(args: argparse.Namespace) -> int:
    from . import distributed as dist_utils
    from .reference_cache import fingerprint, write_cache
    from .train import autocast_for, prepare, resolve_model_path, score_reference_set

    config = load_config(args.config)
    recipe = load_recipe(args.recipe)
    if recipe.algorithm != "rho1" or config.reference_cache is None:
        raise ConfigError("score-reference needs a recipe with algorithm: rho1 and a config with reference_cache")
    device = dist_utils.resolve_device(config.compute.device)
    setup = prepare(config, recipe, dist_utils.DistInfo(0, 1, 0, device), score_reference=True)
    autocast = autocast_for(device, config.compute.precision)
    started = time.monotonic()
    ref = score_reference_set(setup, recipe.train.micro_batch_size, autocast)
    key = fingerprint(setup.train_set, setup.tokenizer, resolve_model_path(config.reference_model.path))
    write_cache(Path(config.reference_cache), ref, key)
    print(f"scored {len(setup.train_set)} sequences ({setup.train_set.n_tokens} tokens) in "
          f"{time.monotonic() - started:.1f}s -> {config.reference_cache} (fingerprint {key[:12]})")
    return 0


def _passk_lines(results: dict) -> list[str]:
    lines = []
    passk = results.get("passk", {})
    for benchmark, entry in passk.get("benchmarks", {}).items():
        cells = []
        for name, value in entry["pass@k"].items():
            if value is None:
                cells.append(f"{name} missing (k > n)")
                continue
            low, high = value["ci95"]
            cells.append(f"{name} {100 * value['mean']:.1f}% [{100 * low:.1f}, {100 * high:.1f}]")
        lines.append(f"{benchmark}: {entry['problems']} problems, n={entry['n']}: " + ", ".join(cells))
    if passk.get("note"):
        lines.append(f"pass@k: {passk['note']}; run `wmtp execute {results.get('generations')} "
                     "--allow-code-execution` to score the generations")
    return lines


def eval_command(args: argparse.Namespace) -> int:
    from .evaluate.checkpoint_eval import evaluate_checkpoint

    unknown = set(args.benchmarks) - {"mbpp", "humaneval", "codecontests"}
    if unknown:
        raise ConfigError(f"--benchmarks: unknown {', '.join(sorted(unknown))} (choose from mbpp, humaneval, "
                          "codecontests)")
    out, results = evaluate_checkpoint(load_config(args.config), load_recipe(args.recipe), args)
    lines = _passk_lines(results)
    for head in (results.get("heads") or {}).get("heads", []):
        if head["ce"] is not None:
            lines.append(f"head {head['head']}: CE {head['ce']:.4f}, ppl {head['ppl']:.2f}, top-1 {head['acc']:.4f}")
    spec = results.get("speculative")
    if spec and spec["mean_accepted_length"] is not None:
        lines.append(f"self-speculative: mean accepted length {spec['mean_accepted_length']:.3f} tokens per forward")
    print("\n".join(lines + [f"results: {out / 'results.json'}, report: {out / 'report.md'}"]))
    return 0


def execute_command(args: argparse.Namespace) -> int:
    from .evaluate.checkpoint_eval import execute_generations

    if not args.allow_code_execution:
        raise ConfigError("wmtp execute runs model-written programs: pass --allow-code-execution to allow it")
    out, results = execute_generations(args)
    print("\n".join(_passk_lines(results) + [f"results: {out / 'results.json'}, report: {out / 'report.md'}"]))
    return 0


def report_command(args: argparse.Namespace) -> int:
    from .evaluate.checkpoint_eval import report_runs

    files = report_runs(args.runs, args.out)
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        if args.command == "train":
            return train_command(args)
        if args.command == "score-reference":
            return score_reference_command(args)
        if args.command == "eval":
            return eval_command(args)
        if args.command == "execute":
            return execute_command(args)
        if args.command == "report":
            return report_command(args)
    except KeyboardInterrupt:
        print("wmtp: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the one place errors become a line and an exit code
        if getattr(args, "verbose", False):
            traceback.print_exc()
        message = str(exc).splitlines()[0] if str(exc) else ""
        if not isinstance(exc, ConfigError | OSError):  # an unexpected error: name its kind
            message = f"{type(exc).__name__}: {message}"
        print(f"wmtp: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
