"""Heads on a frozen trunk: the optimizer step's time reading the trunk's cached states (`wmtp cache-states`,
config `trunk_cache`) against the same step through the frozen trunk, in one process, on one thread.

Per model: set-up through the trunk (`mtp.trainable: heads`), the cache written from that set-up's model and data
(the time and the file's size are reported), a second set-up that reads the cache, then `--warmup` and `--steps`
timed optimizer steps (`Trainer.train_step`) of the two trainers interleaved, so both see the same machine. Both
start from the same heads and train on the same rows; the largest difference of their heads' parameters after the
steps is reported too (it should be float rounding). Models: the demo's small Llama (configs/env/demo.yaml) and
SmolLM2-135M-Instruct from the GGUF file (configs/env/smollm2-gguf.yaml), on a little data, few steps.

    python benchmarks/heads_cache.py --out benchmarks/results/heads_cache_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "demo": ("configs/env/demo.yaml", "configs/recipes/baseline-mtp/demo.yaml",
             ["data.train=[{kind: python-stdlib, limit: 10}]", "data.validation_fraction=0.2", "data.max_length=128",
              "train.micro_batch_size=8"]),
    "smollm2-135m": ("configs/env/smollm2-gguf.yaml", "configs/recipes/baseline-mtp/smollm2-heads.yaml",
                     ["data.train=[{kind: mbpp, dataset: mbpp, split: train, limit: 24}]",
                      "data.validation=[{kind: mbpp, dataset: mbpp, split: validation, limit: 4}]",
                      "data.max_length=128", "train.micro_batch_size=2"]),
}


def trainers(name: str, directory: Path, args):
    """(through the trunk, from the cache, cache facts) for one model."""
    import torch

    from wmtp.config import load_config, load_recipe, parse_overrides
    from wmtp.runtime.distributed import DistInfo
    from wmtp.training.build import prepare
    from wmtp.training.trainer import Trainer
    from wmtp.training.trunk_cache import cache_states
    from wmtp.weighting import config_section_names

    config_file, recipe_file, sets = MODELS[name]
    sets = [*sets, "mtp.trainable=heads", f"train.max_steps={args.warmup + args.steps + 1}", "compute.device=cpu",
            f"compute.threads={args.threads}", f"output_dir={directory / 'runs'}", "train.eval_every=null",
            "mlflow.enabled=false", "logging.progress=false", "checkpoint.every_steps=null"]
    config_overrides, recipe_overrides, texts = parse_overrides(sets, config_section_names())
    config = load_config(ROOT / config_file, config_overrides, texts)
    recipe = load_recipe(ROOT / recipe_file, recipe_overrides, texts)
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    through = prepare(config, recipe, info)
    cache = directory / f"{name}.safetensors"
    started = time.perf_counter()
    cache_states(config, recipe, through.data, through.model, cache)
    facts = {"cache_seconds": time.perf_counter() - started, "cache_bytes": cache.stat().st_size,
             "train_sequences": len(through.train_set), "sequence_length": recipe.data.max_length,
             "tokens_per_step": through.plan.sequences_per_step * recipe.data.max_length,
             "hidden_size": through.model.unembedding.weight.shape[1], "n_heads": recipe.mtp.n_heads,
             "layers": through.model.config.num_hidden_layers, "vocab": through.model.unembedding.weight.shape[0]}
    cached = prepare(config.model_copy(update={"trunk_cache": str(cache)}), recipe, info)
    return (Trainer(through, directory / "runs" / f"{name}-through", run_name="through"),
            Trainer(cached, directory / "runs" / f"{name}-cached", run_name="cached"), facts)


def measure(name: str, directory: Path, args) -> dict:
    import torch

    through, cached, facts = trainers(name, directory, args)
    times: dict[str, list[float]] = {"through": [], "cached": []}
    for i in range(args.warmup + args.steps):
        for label, trainer in (("through", through), ("cached", cached)):
            started = time.perf_counter()
            trainer.train_step()
            if i >= args.warmup:
                times[label].append(time.perf_counter() - started)
            trainer.step += 1
    heads = dict(through.model.heads.named_parameters())
    difference = max(float((p - heads[k]).detach().abs().max()) for k, p in cached.model.heads.named_parameters())
    through_s, cached_s = statistics.median(times["through"]), statistics.median(times["cached"])
    row = {"model": name, **facts, "through_step_seconds": through_s, "cached_step_seconds": cached_s,
           "speedup": through_s / cached_s, "step_seconds": times, "max_head_difference": difference,
           "torch_threads": torch.get_num_threads()}
    print(f"{name}: through the trunk {through_s:.3f} s/step, from the cache {cached_s:.3f} s/step: "
          f"{row['speedup']:.2f}x; cache {facts['cache_bytes'] / 2**20:.1f} MiB written in "
          f"{facts['cache_seconds']:.1f}s; heads differ by at most {difference:.2e}", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(name, Path(tmp), args) for name in args.models]
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "argv": sys.argv}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
