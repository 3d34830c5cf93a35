"""What each weighting scheme costs: optimizer-step time and peak memory relative to baseline-mtp, on the same model
and batch, in one run.

Every variant runs in a fresh process (so its peak memory is its own): set-up, `--warmup` steps, then `--steps`
timed optimizer steps (`Trainer.train_step`: the scheme's weights, the forward and backward of every micro-batch,
the optimizer). A scheme's own stage before training (the critic's stage 1) is not timed. The whole sweep is
repeated `--repeats` times, interleaved, and the median step time of each variant is divided by the baseline's of
the same repeat; the table shows the median ratio over repeats. Memory: CUDA `max_memory_allocated`, or on CPU
the growth of the resident set from just before the model is built to the peak of the steps (`ru_maxrss`).

Variants: baseline-mtp; Rho-1 (weighted) with a cached reference, with `scoring: separate_pass` and `in_forward`,
and with the reference run online; gradnorm in both scorings; the critic (GAE; stage 1 of 2 steps, untimed);
a hybrid of Rho-1 (cached) and gradnorm; GRPO when the scheme table has it.

    python benchmarks/scheme_overhead.py --out experiments/scheme-overhead/results/scheme_overhead_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WEIGHTED = {"mode": "weighted"}
VARIANTS = {
    "baseline-mtp": {"algorithm": "baseline-mtp"},
    "rho1 cached, separate_pass": {"algorithm": "rho1", "rho1": WEIGHTED, "_cache": True},
    "rho1 cached, in_forward": {"algorithm": "rho1", "rho1": {**WEIGHTED, "scoring": "in_forward"}, "_cache": True},
    "rho1 online reference": {"algorithm": "rho1", "rho1": WEIGHTED},
    "gradnorm, separate_pass": {"algorithm": "gradnorm", "gradnorm": {}},
    "gradnorm, in_forward": {"algorithm": "gradnorm", "gradnorm": {"scoring": "in_forward"}},
    "critic (gae)": {"algorithm": "critic", "critic": {"reward": {"kind": "verifiable", "check": "parses"},
                                                       "advantage": "gae", "lam": 1.0},
                     "pretrain": {"max_steps": 2, "early_stopping": "none"}},
    "hybrid rho1 × gradnorm": {"algorithm": "hybrid", "hybrid": {"components": ["rho1", "gradnorm"]},
                               "rho1": WEIGHTED, "gradnorm": {}, "_cache": True},
    "grpo": {"algorithm": "grpo"},
}


def files(directory: Path, args, name: str) -> tuple[Path, Path]:
    variant = VARIANTS[name]
    model = {"hidden_size": args.hidden, "num_layers": args.layers, "num_attention_heads": 4, "num_key_value_heads": 4,
             "intermediate_size": args.hidden * 8 // 3, "max_position_embeddings": 1024, "tie_word_embeddings": False}
    config = {"model": {"from_scratch": model, "tokenizer": str(directory / "tokenizer")},
              "datasets": {"corpus": str(directory / "corpus.jsonl")},
              "output_dir": str(directory / "runs"),
              "compute": {"device": args.device, "precision": args.precision, "threads": args.threads},
              "mlflow": {"enabled": False}, "logging": {"progress": False}}
    if variant["algorithm"] in ("rho1", "hybrid"):
        config["reference_model"] = {"path": str(directory / "reference")}
        if variant.get("_cache"):
            config["reference_cache"] = str(directory / "reference-cache.safetensors")
    recipe = {k: v for k, v in variant.items() if not k.startswith("_")}
    recipe.update({"mtp": {"n_heads": args.n_heads},
                   "data": {"train": [{"kind": "jsonl", "dataset": "corpus"}], "validation_fraction": 0.0,
                            "max_length": args.seq},
                   "train": {"micro_batch_size": args.batch, "grad_accum_steps": args.accum,
                             "max_steps": args.warmup + args.steps + 1}})
    if recipe["algorithm"] == "grpo":
        recipe["grpo"] = {"group_size": 4, "max_new_tokens": args.seq // 4,
                          "reward": {"kind": "verifiable", "check": "parses"}}
    slug = "".join(c if c.isalnum() else "-" for c in name)
    config_path, recipe_path = directory / f"config-{slug}.json", directory / f"recipe-{slug}.json"
    config_path.write_text(json.dumps(config))
    recipe_path.write_text(json.dumps(recipe))
    return config_path, recipe_path


def measure(config_path: str, recipe_path: str, warmup: int, steps: int, out: str) -> None:
    import torch
    from scale import mark_model_build  # benchmarks/scale.py: the same memory measure

    from wmtp.config import load_config, load_recipe
    from wmtp.runtime.distributed import DistInfo, resolve_device
    from wmtp.training import build as setup_module
    from wmtp.training.trainer import Trainer

    config, recipe = load_config(config_path), load_recipe(recipe_path)
    info = DistInfo(0, 1, 0, resolve_device(config.compute.device))
    before = mark_model_build(info)
    setup = setup_module.prepare(config, recipe, info)
    trainer = Trainer(setup, Path(tempfile.mkdtemp()), run_name="overhead")
    trainer.scheme.before_training(trainer.hooks())
    times = []
    for i in range(warmup + steps):
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        trainer.train_step()
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - started)
        trainer.step += 1
    result = {"step_seconds": statistics.median(times), "all_step_seconds": times,
              "cpu_peak_growth": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before["rss"]}
    if info.device.type == "cuda":
        result["cuda_peak"] = torch.cuda.max_memory_allocated() - before["cuda"]
    Path(out).write_text(json.dumps(result))


def prepare_shared(directory: Path, args) -> None:
    """The corpus, a tokenizer trained on it, a reference model with that tokenizer, and its CE cache."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from wmtp.cli import main as wmtp_main
    from wmtp.data.sequences import train_bpe_tokenizer
    from wmtp.data.sources import stdlib_files

    texts = [p.read_text(errors="ignore") for p in stdlib_files()[:args.files]]
    with (directory / "corpus.jsonl").open("w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    tokenizer = train_bpe_tokenizer(texts, args.vocab, 2)
    tokenizer.save_pretrained(str(directory / "tokenizer"))
    torch.manual_seed(0)
    reference = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden,
                                             intermediate_size=args.hidden * 8 // 3, num_hidden_layers=args.layers,
                                             num_attention_heads=4, num_key_value_heads=4,
                                             max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id))
    reference.save_pretrained(directory / "reference")
    tokenizer.save_pretrained(str(directory / "reference"))
    config_path, recipe_path = files(directory, args, "rho1 cached, separate_pass")
    if wmtp_main(["score-reference", "--config", str(config_path), "--recipe", str(recipe_path)]) != 0:
        raise SystemExit("scoring the reference cache failed")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--measure":
        measure(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--files", type=int, default=120, help="standard-library files in the corpus")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=None, help="default: every variant whose scheme exists")
    args = p.parse_args()
    from wmtp.weighting import SCHEMES

    names = args.variants or [n for n, v in VARIANTS.items() if v["algorithm"] in SCHEMES]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT / "src"),
           "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    rows: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        prepare_shared(directory, args)
        for repeat in range(args.repeats):
            for name in names:
                config_path, recipe_path = files(directory, args, name)
                out = directory / f"measured-{repeat}-{len(rows[name])}-{names.index(name)}.json"
                done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--measure", str(config_path),
                                       str(recipe_path), str(args.warmup), str(args.steps), str(out)],
                                      env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{name}: failed\n{done.stderr[-3000:]}")
                rows[name].append(json.loads(out.read_text()))
                print(f"repeat {repeat} {name}: {rows[name][-1]['step_seconds']:.3f} s/step", flush=True)
    key = "cuda_peak" if args.device == "cuda" else "cpu_peak_growth"
    table = []
    for name in names:
        ratios = [r["step_seconds"] / b["step_seconds"] for r, b in zip(rows[name], rows["baseline-mtp"], strict=True)]
        memory = [r[key] / b[key] for r, b in zip(rows[name], rows["baseline-mtp"], strict=True)]
        table.append({"variant": name, "step_seconds": statistics.median(r["step_seconds"] for r in rows[name]),
                      "time_ratio": statistics.median(ratios), "time_ratios": ratios,
                      "peak_bytes": statistics.median(r[key] for r in rows[name]),
                      "memory_ratio": statistics.median(memory)})
    lines = ["| scheme | step time (s) | × baseline | peak memory (MiB) | × baseline |", "|---|---|---|---|---|"]
    for row in table:
        lines.append(f"| {row['variant']} | {row['step_seconds']:.3f} | {row['time_ratio']:.2f} | "
                     f"{row['peak_bytes'] / 2**20:.0f} | {row['memory_ratio']:.2f} |")
    print("\n".join(lines))
    import torch

    result = {"args": {k: str(v) for k, v in vars(args).items()}, "measure": key, "rows": table, "raw": rows,
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "argv": sys.argv}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
