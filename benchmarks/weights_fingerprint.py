"""Fingerprints of the final weights of five fixed runs, to show that a change of structure changed no result.

Runs, each through the `wmtp` command with one torch thread (summation order fixed):
- `demo`: `configs/env/demo.yaml` + `configs/recipes/baseline-mtp/demo.yaml` (200 steps, about 4 minutes here);
- `rho1`: a tiny next-token reference, then a tiny Rho-1 `weighted` run against it (online reference);
- `critic`: a tiny Critic-WMTP run on a marker corpus (labels reward), stage 1 then stage 2;
- `gradnorm`: a tiny gradient-norm weighted run (signal norm, weights up);
- `grpo`: a tiny GRPO run: completions sampled from the model, rewarded by the share of their digits.

Prints and writes `<out>/fingerprints.json`: per run, the SHA-256 of every tensor of the final model's
safetensors files (and of the critic's value head). Run it before and after a change and compare:

    python benchmarks/weights_fingerprint.py --out /tmp/before
    python benchmarks/weights_fingerprint.py --out /tmp/after
    diff /tmp/before/fingerprints.json /tmp/after/fingerprints.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SNIPPETS = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n\nprint(f{i}({i}))\n" for i in range(120)]
WORDS = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta", "zeta", "lambda"]
TINY_MODEL = {"from_scratch": {"hidden_size": 32, "num_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                               "intermediate_size": 64, "max_position_embeddings": 128},
              "train_tokenizer": {"vocab_size": 300, "min_frequency": 2}}


def tiny_config(out: Path, datasets: dict[str, str], **extra) -> dict:
    return {"model": TINY_MODEL, "datasets": datasets, "output_dir": str(out / "runs"),
            "compute": {"device": "cpu", "seed": 0}, "mlflow": {"enabled": False},
            "logging": {"progress": False, "log_every": 1}, **extra}


def tiny_recipe(train_source: str, **extra) -> dict:
    return {"mtp": {"n_heads": 3}, "data": {"train": [{"kind": "jsonl", "dataset": train_source}],
                                            "validation_fraction": 0.1, "max_length": 32},
            "optim": {"lr": 3e-3}, "schedule": {"kind": "cosine", "warmup_steps": 1},
            "train": {"micro_batch_size": 4, "max_steps": 4}, **extra}


def digit_share(examples) -> list[float]:
    """The GRPO run's reward (`kind: function`, `weights_fingerprint:digit_share`): the share of a completion's
    characters that are digits, so the rewards of a group differ and the advantages are not all 0."""
    return [sum(ch.isdigit() for ch in ex.completion) / max(len(ex.completion), 1) for ex in examples]


def train(out: Path, name: str, config: dict | Path, recipe: dict | Path) -> Path:
    paths = []
    for kind, value in (("config", config), ("recipe", recipe)):
        if isinstance(value, dict):
            path = out / f"{name}-{kind}.yaml"
            path.write_text(yaml.safe_dump(value))
            value = path
        paths.append(value)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "WMTP_OUTPUT_DIR": str(out / "runs"), "WMTP_DEVICE": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "wmtp", "train", "--config", str(paths[0]), "--recipe", str(paths[1]),
               "--run-name", name]
    subprocess.run(command, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    return out / "runs" / name


def tensor_digests(directory: Path) -> dict[str, str]:
    digests = {}
    for file in sorted(directory.rglob("*.safetensors")):
        for key, value in sorted(load_file(file).items()):
            digests[f"{file.relative_to(directory)}:{key}"] = hashlib.sha256(
                value.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
    return digests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", nargs="+", default=["demo", "rho1", "critic", "gradnorm", "grpo"])
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    snippets = out / "snippets.jsonl"
    snippets.write_text("".join(json.dumps({"text": s}) + "\n" for s in SNIPPETS))
    rng = random.Random(0)
    marker_lines = []
    for i in range(400):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
        if i % 2 == 0:
            words.insert(rng.randint(1, len(words) - 1), "MARK")
        marker_lines.append(json.dumps({"text": " ".join(words), "label": int(i % 2 == 0)}) + "\n")
    marker = out / "marker.jsonl"
    marker.write_text("".join(marker_lines))
    prompts = out / "prompts.jsonl"  # a function's first line as the prompt, its body as the completion
    prompts.write_text("".join(json.dumps(dict(zip(("prompt", "completion"), s.split("\n", 1), strict=True))) + "\n"
                               for s in SNIPPETS))

    fingerprints = {}
    if "demo" in args.runs:
        run = train(out, "demo", ROOT / "configs/env/demo.yaml", ROOT / "configs/recipes/baseline-mtp/demo.yaml")
        fingerprints["demo"] = tensor_digests(run / "final")
    if "rho1" in args.runs:
        datasets = {"snippets": str(snippets)}
        reference = train(out, "reference", tiny_config(out, datasets),
                          tiny_recipe("snippets", mtp={"n_heads": 1}, train={"micro_batch_size": 4, "max_steps": 5}))
        run = train(out, "rho1", tiny_config(out, datasets, reference_model={"path": str(reference / "final")}),
                    tiny_recipe("snippets", algorithm="rho1", rho1={"mode": "weighted"}))
        fingerprints["rho1"] = tensor_digests(run / "final")
    if "critic" in args.runs:
        config = tiny_config(out, {"marker": str(marker)})
        recipe = tiny_recipe("marker", algorithm="critic",
                             critic={"reward": {"kind": "labels"}, "value_hidden": 16, "advantage": "gae"},
                             pretrain={"max_steps": 6, "lr": 3e-3, "eval_every": 3})
        run = train(out, "critic", config, recipe)
        fingerprints["critic"] = tensor_digests(run / "final") | {
            f"critic/{k}": v for k, v in tensor_digests(run / "critic").items()}
    if "gradnorm" in args.runs:
        run = train(out, "gradnorm", tiny_config(out, {"snippets": str(snippets)}),
                    tiny_recipe("snippets", algorithm="gradnorm", gradnorm={"signal": "norm", "direction": "up"}))
        fingerprints["gradnorm"] = tensor_digests(run / "final")
    if "grpo" in args.runs:
        recipe = tiny_recipe("prompts", algorithm="grpo", mtp={"n_heads": 2},
                             grpo={"reward": {"kind": "function", "function": "weights_fingerprint:digit_share"},
                                   "group_size": 4, "max_new_tokens": 8},
                             schedule={"kind": "constant"}, train={"micro_batch_size": 8, "max_steps": 3})
        run = train(out, "grpo", tiny_config(out, {"prompts": str(prompts)}), recipe)
        fingerprints["grpo"] = tensor_digests(run / "final")
    (out / "fingerprints.json").write_text(json.dumps(fingerprints, indent=1, sort_keys=True))
    for name, digests in fingerprints.items():
        combined = hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()[:16]
        print(f"{name}: {len(digests)} tensors, combined {combined}")


if __name__ == "__main__":
    main()
