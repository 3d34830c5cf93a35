"""GRPO against baseline-mtp on a synthetic task whose reward is known, over seeds.

The task (as in tests/weighting/test_grpo.py): prompts are 2-5 words and a colon; the data's completions mix words and
numbers; the reward of a completion is the share of its characters that are digits. A tiny Llama-family model
(hidden 32, 2 layers, n = 2 heads) and a BPE tokenizer are trained from scratch for --steps steps per seed:
- baseline-mtp on the data's completions (it learns the data, whose completions are 5.0% digits);
- grpo on its own samples (group size 8, temperature 1, 8 new tokens), rewarded by the digit share.
Both are then measured the same way: 8 samples (temperature 1, 8 new tokens) for each of 100 held-out prompts,
from head 0, mean reward. The table holds mean ± std over seeds and the paired difference with its 95% t
interval (`wmtp.evaluate.compare.difference`).

    python experiments/grpo-synthetic/grpo_synthetic.py --out experiments/grpo-synthetic/results/grpo_synthetic.json \
        --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from wmtp.config import Config, Recipe
from wmtp.data.sources import Example
from wmtp.evaluate.compare import difference
from wmtp.runtime.distributed import DistInfo
from wmtp.training.build import prepare
from wmtp.training.trainer import Trainer

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta", "zeta", "lambda"]


def digit_share(examples: list[Example]) -> list[float]:
    """The reward: the share of the completion's characters that are digits."""
    return [sum(ch.isdigit() for ch in ex.completion) / max(len(ex.completion), 1) for ex in examples]


def corpus(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5))) + ":"
        completion = " " + " ".join(rng.choice([*WORDS, str(rng.randint(0, 999))]) for _ in range(rng.randint(2, 6)))
        rows.append({"prompt": prompt, "completion": completion})
    return rows


def train(directory: Path, algorithm: str, seed: int, steps: int) -> Trainer:
    config = {"model": {"from_scratch": {"hidden_size": 32, "num_layers": 2, "num_attention_heads": 4,
                                         "num_key_value_heads": 2, "intermediate_size": 64,
                                         "max_position_embeddings": 64},
                        "train_tokenizer": {"vocab_size": 300, "min_frequency": 2}},
              "datasets": {"words": str(directory / "words.jsonl")}, "output_dir": str(directory / "runs"),
              "compute": {"device": "cpu", "seed": seed}, "checkpoint": {"keep_last": 1},
              "mlflow": {"enabled": False}, "logging": {"progress": False, "log_every": 10}}
    recipe = {"algorithm": algorithm, "mtp": {"n_heads": 2},
              "data": {"train": [{"kind": "jsonl", "dataset": "words"}], "validation_fraction": 0.0,
                       "max_length": 32, "shuffle_seed": seed},
              "optim": {"lr": 3e-3}, "schedule": {"kind": "constant"},
              "train": {"micro_batch_size": 16, "max_steps": steps}}
    if algorithm == "grpo":
        recipe["grpo"] = {"reward": {"kind": "function", "function": "grpo_synthetic:digit_share"},
                          "group_size": 8, "max_new_tokens": 8}
    setup = prepare(Config.model_validate(config), Recipe.model_validate(recipe), DistInfo(0, 1, 0,
                                                                                          torch.device("cpu")))
    trainer = Trainer(setup, directory / "runs" / f"{algorithm}-s{seed}", run_name=f"{algorithm}-s{seed}")
    trainer.run()
    return trainer


@torch.no_grad()
def measured_reward(trainer: Trainer, prompts: list[str], samples: int, seed: int) -> float:
    tokenizer, model = trainer.setup.tokenizer, trainer.model.eval()
    torch.manual_seed(1000 + seed)
    rewards = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        if tokenizer.bos_token_id is not None and (ids.numel() == 0 or ids[0, 0] != tokenizer.bos_token_id):
            ids = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), ids], dim=1)
        out = model.generate(ids.repeat(samples, 1), attention_mask=torch.ones_like(ids.repeat(samples, 1)),
                             do_sample=True, temperature=1.0, top_p=1.0, max_new_tokens=8,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        rewards += digit_share([Example(prompt, t, "held-out", prompt) for t in texts])
    return sum(rewards) / len(rewards)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--samples", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # the reward function, by name
    held_out = [row["prompt"] for row in corpus(100, seed=12345)]
    results: dict[str, dict[str, float]] = {"baseline-mtp": {}, "grpo": {}}
    started = time.monotonic()
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp)
            (directory / "words.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus(200, seed=0)))
            for algorithm in results:
                trainer = train(directory, algorithm, seed, args.steps)
                results[algorithm][str(seed)] = measured_reward(trainer, held_out, args.samples, seed)
                print(f"seed {seed} {algorithm}: held-out reward {results[algorithm][str(seed)]:.3f}", flush=True)
    d = difference(results["grpo"], results["baseline-mtp"])
    lines = ["| scheme | held-out reward (mean ± std over seeds) |", "|---|---|"]
    for algorithm, values in results.items():
        v = list(values.values())
        lines.append(f"| {algorithm} | {statistics.mean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0:.3f} |")
    lines.append(f"\npaired difference grpo − baseline: {d.mean:+.3f}, 95% t interval [{d.low:+.3f}, {d.high:+.3f}], "
                 f"{d.higher} of {d.n} seeds higher: {d.verdict}")
    print("\n".join(lines))
    print(f"total {time.monotonic() - started:.0f}s, torch {torch.__version__}, 1 thread")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results, "difference": d.__dict__, "verdict": d.verdict,
                                    "args": {k: str(v) for k, v in vars(args).items()},
                                    "seconds": time.monotonic() - started, "torch": torch.__version__}, indent=1))


if __name__ == "__main__":
    main()
