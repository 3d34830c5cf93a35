"""Draft heads of SmolLM2-135M side by side: per-depth teacher-forced acceptance and expected tokens per forward on
each run's own validation hold-out (the same `head_quality` as training's validation, docs/method.md §6), with each
head's CE and top-1 accuracy.

    python experiments/smollm2/heads_side_by_side.py runs/seq3 runs/tr3 ... --dtype bfloat16 --out results.json

Each argument is a `wmtp train` run directory: its final model, and the config.yaml and recipe.yaml it resolved
(so the validation rows are the ones that run held out). Writes one JSON object keyed by run name.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from wmtp import MTPModel
from wmtp.components.validate import head_quality
from wmtp.config import RUN_CONFIG_FILE, RUN_RECIPE_FILE, load_config, load_recipe
from wmtp.runtime.precision import DTYPES
from wmtp.training.build import load_run_data


def measure(run: Path, dtype: str, batch_size: int) -> dict:
    config, recipe = load_config(run / RUN_CONFIG_FILE), load_recipe(run / RUN_RECIPE_FILE)
    data = load_run_data(config, recipe, tokenizer_dir=run / "final")
    model = MTPModel.from_pretrained(run / "final", dtype=DTYPES[dtype]).eval()
    started = time.monotonic()
    quality = head_quality(model, data.val_set, batch_size=batch_size, mask_prompt=recipe.data.mask_prompt,
                           chunk_size=recipe.loss.chunk_size)
    return {"head_type": model.mtp_config.head_type, "n_heads": model.n_heads, "dtype": dtype,
            "validation_sequences": len(data.val_set), "seconds": round(time.monotonic() - started, 1),
            "heads": quality["heads"], "acceptance": quality["acceptance"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {run.name: measure(run, args.dtype, args.batch_size) for run in args.runs}
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    for name, r in results.items():
        acc = r["acceptance"]
        rates = " / ".join("—" if d["rate"] is None else f"{d['rate']:.3f}" for d in acc["depths"])
        print(f"{name}: {r['head_type']}, acceptance per depth {rates}, expected tokens per forward "
              f"{acc['tokens_per_forward']}")


if __name__ == "__main__":
    main()
