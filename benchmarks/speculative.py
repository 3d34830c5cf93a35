"""Greedy decoding speed: Hugging Face `generate` (KV cache) vs self-speculative decoding with the MTP heads.

Model: `--model DIR`, a directory saved by wmtp (`runs/<run>/final` after `make demo`); by default the demo
model is trained here first (configs/env/demo.yaml + configs/recipes/baseline-mtp/demo.yaml, about 3.5 minutes on 2 CPU
cores; `--train-steps` shortens it) and saved under `--output-dir`, whose path is printed for reuse.

Prompts: `--prompts` windows of `--prompt-tokens` tokens at seeded random offsets of the recipe's held-out
(validation) Python files, which the model never trained on. Both methods decode exactly `--new-tokens`
tokens per prompt (no eos stop), and their outputs are compared token for token.

Timing: a warm-up round (which also checks the outputs), then `--repeats` rounds; each round decodes every
prompt with every method, in an order that rotates from prompt to prompt so that load from other processes hits
all methods alike. A method's tokens/s in a round is its new tokens over its time; the table gives the median
over rounds (and every round). `speculative, n_draft=0` is the same loop with no drafts: it separates this
loop's own overhead from what speculation gains.

Run by hand: `.venv/bin/python benchmarks/speculative.py` (CPU, trains the demo model first);
`--model runs/<run>/final --device cuda --dtype bfloat16` on a GPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer, GenerationConfig

from wmtp import MTPModel
from wmtp.config import load_config, load_recipe
from wmtp.data.sequences import pad_token_id
from wmtp.data.sources import load_examples
from wmtp.evaluate.speculative import SpeculativeResult, speculative_generate
from wmtp.runtime.distributed import DistInfo
from wmtp.training.build import prepare
from wmtp.training.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent


def train_demo(args: argparse.Namespace) -> Path:
    """Train the demo model (MLflow off, checkpoints only at the end); the path of its final model."""
    config = load_config(args.config)
    config = config.model_copy(update={
        "output_dir": args.output_dir,
        "compute": config.compute.model_copy(update={"device": args.device}),
        "mlflow": config.mlflow.model_copy(update={"enabled": False}),
        "checkpoint": config.checkpoint.model_copy(update={"every_steps": None}),
    })
    recipe = load_recipe(args.recipe)
    if args.train_steps is not None:
        recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update={"max_steps": args.train_steps})})
    setup = prepare(config, recipe, DistInfo(0, 1, 0, torch.device(args.device)))
    run_dir = Path(config.output_dir) / f"speculative-bench-{time.strftime('%Y%m%d-%H%M%S')}"
    result = Trainer(setup, run_dir, run_name=run_dir.name).run()
    scores = ", ".join(f"{k} {v:.3f}" for k, v in result["eval"].items() if k == "val/loss" or "acc" in k)
    print(f"trained {result['step']} steps ({scores}); reuse with --model {result['final_model']}")
    return Path(result["final_model"])


def held_out_prompts(args: argparse.Namespace, tokenizer) -> list[list[int]]:
    """`--prompts` windows of `--prompt-tokens` tokens from the recipe's validation files, seeded offsets."""
    _, validation = load_examples(load_recipe(args.recipe).data, load_config(args.config).datasets)
    documents = [ids for ex in validation
                 if len(ids := tokenizer(ex.prompt + ex.completion)["input_ids"]) > args.prompt_tokens]
    if not documents:
        raise SystemExit(f"no held-out document is longer than --prompt-tokens {args.prompt_tokens}")
    rng = random.Random(args.seed)
    prompts = []
    for i in range(args.prompts):
        ids = documents[i % len(documents)]
        start = rng.randrange(len(ids) - args.prompt_tokens)
        prompts.append(ids[start:start + args.prompt_tokens])
    return prompts


def pooled(results: list[SpeculativeResult]) -> SpeculativeResult:
    """The statistics of several runs as one."""
    return SpeculativeResult([t for r in results for t in r.tokens], sum(r.forward_passes for r in results),
                             [sum(c) for c in zip(*(r.proposed for r in results), strict=True)],
                             [sum(c) for c in zip(*(r.accepted for r in results), strict=True)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a saved wmtp model directory (default: train the demo model first)")
    parser.add_argument("--config", type=Path, default=ROOT / "configs/env/demo.yaml",
                        help="config of the training run: its data sources give the held-out prompts")
    parser.add_argument("--recipe", type=Path, default=ROOT / "configs/recipes/baseline-mtp/demo.yaml",
                        help="recipe of the training run: its validation hold-out gives the prompts")
    parser.add_argument("--train-steps", type=int, help="optimizer steps when training the demo model "
                        "(default: the recipe's)")
    parser.add_argument("--output-dir", default="runs", help="where the demo model is trained")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up; medians reported")
    parser.add_argument("--seed", type=int, default=0, help="prompt offsets")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    device = torch.device(args.device)
    model_dir = Path(args.model) if args.model else train_demo(args)
    model = MTPModel.from_pretrained(model_dir, dtype=getattr(torch, args.dtype)).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    prompts = [torch.tensor([p], device=device) for p in held_out_prompts(args, tokenizer)]
    # `generate` falls back to the model's eos when given none; both methods must decode --new-tokens tokens.
    model.base.generation_config.eos_token_id = None
    generation = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None,
                                  pad_token_id=pad_token_id(tokenizer))

    def hf_generate(prompt: torch.Tensor) -> list[int]:
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=generation)
        return out[0, prompt.shape[1]:].tolist()

    methods = {"HF generate (greedy, KV cache)": hf_generate,
               "speculative, n_draft=0": lambda p: speculative_generate(model, p, args.new_tokens, n_draft=0),
               f"speculative, n_draft={model.n_heads - 1}": lambda p: speculative_generate(model, p, args.new_tokens)}
    names = list(methods)
    times: dict[str, list[float]] = {name: [] for name in names}
    outputs: dict[str, list] = {name: [] for name in names}
    for round_ in range(args.repeats + 1):  # round 0 is the warm-up
        elapsed = dict.fromkeys(names, 0.0)
        for i, prompt in enumerate(prompts):
            for name in names[i % len(names):] + names[:i % len(names)]:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                out = methods[name](prompt)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed[name] += time.perf_counter() - start
                if round_ == 0:
                    outputs[name].append(out)
        if round_:
            for name in names:
                times[name].append(len(prompts) * args.new_tokens / elapsed[name])

    reference = outputs[names[0]]
    n_params = sum(p.numel() for p in model.parameters())
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor()
                                                                                     or platform.machine())
    print(f"command: {shlex.join([os.path.relpath(sys.executable), *sys.argv])}")
    print(f"model: {model_dir} ({model.config.model_type}, {n_params / 1e6:.1f}M parameters with heads, "
          f"n_heads={model.n_heads}, {model.mtp_config.head_type} heads), dtype {args.dtype}")
    print(f"machine: device {args.device} ({device_name}), {os.cpu_count()} CPUs, {torch.get_num_threads()} torch "
          f"threads, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"prompts: {len(prompts)} held-out windows of {args.prompt_tokens} tokens, {args.new_tokens} new tokens "
          f"each, {args.repeats} timed rounds after a warm-up\n")
    header = ["method", "tokens/s (median)", "tokens/s per round", "speed-up vs generate", "identical outputs",
              "tokens per forward", "acceptance rate per draft head"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    base_speed = statistics.median(times[names[0]])
    for name in names:
        speed = statistics.median(times[name])
        tokens = [r if isinstance(r, list) else r.tokens for r in outputs[name]]
        same = sum(a == b for a, b in zip(tokens, reference, strict=True))
        if name == names[0]:
            per_forward, rates = "1.00", "-"
        else:
            stats = pooled(outputs[name])
            per_forward = f"{stats.mean_accepted_length:.2f}"
            rates = ", ".join(f"h{h + 1} " + ("–" if r is None else f"{r:.2f}")
                              for h, r in enumerate(stats.acceptance_rates)) or "-"
        rounds = ", ".join(f"{t:.0f}" for t in times[name])
        print(f"| {name} | {speed:.1f} | {rounds} | {speed / base_speed:.2f} | {same}/{len(prompts)} | "
              f"{per_forward} | {rates} |")
    print("\nacceptance rate of head h: drafts of head h accepted / verified, where head h's draft is verified only "
          "when drafts 1..h-1 of its step were accepted; tokens per forward = new tokens / forward passes "
          f"(prefill included)\nwall time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
