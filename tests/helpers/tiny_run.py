"""A tiny end-to-end run for trainer tests: a from-scratch Llama with a BPE tokenizer trained on a small JSONL
corpus of Python snippets. `files(tmp_path, config=..., recipe=...)` writes the two YAML files with overrides."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml

SNIPPETS = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n\nprint(f{i}({i}))\n" for i in range(120)]

CONFIG = {
    "model": {
        "from_scratch": {"hidden_size": 32, "num_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                         "intermediate_size": 64, "max_position_embeddings": 128},
        "train_tokenizer": {"vocab_size": 300, "min_frequency": 2},
    },
    "datasets": {},
    "compute": {"device": "cpu", "seed": 0},
    "checkpoint": {"keep_last": 2},
    "mlflow": {"enabled": False, "experiment": "tests"},
    "logging": {"log_every": 1, "progress": False},
}

RECIPE = {
    "algorithm": "baseline-mtp",
    "mtp": {"n_heads": 3, "head_type": "transformer"},
    "data": {"train": [{"kind": "jsonl", "dataset": "snippets"}], "validation_fraction": 0.1, "max_length": 32},
    "optim": {"lr": 3e-3},
    "schedule": {"kind": "cosine", "warmup_steps": 1},
    "train": {"micro_batch_size": 4, "max_steps": 4},
}


def merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def files(tmp_path: Path, config: dict | None = None, recipe: dict | None = None) -> tuple[Path, Path]:
    corpus = tmp_path / "snippets.jsonl"
    if not corpus.exists():
        corpus.write_text("".join(json.dumps({"text": s}) + "\n" for s in SNIPPETS))
    cfg = merge(CONFIG, {"output_dir": str(tmp_path / "runs"), "datasets": {"snippets": str(corpus)}})
    cfg = merge(cfg, config or {})
    rcp = merge(RECIPE, recipe or {})
    config_path, recipe_path = tmp_path / "config.yaml", tmp_path / "recipe.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    recipe_path.write_text(yaml.safe_dump(rcp))
    return config_path, recipe_path


def train_args(tmp_path: Path, run_name: str = "run", **overrides) -> list[str]:
    config_path, recipe_path = files(tmp_path, **overrides)
    return ["train", "--config", str(config_path), "--recipe", str(recipe_path), "--run-name", run_name]


def final_weights(run_dir: Path) -> dict:
    """Every tensor of a run's final model: the base model's safetensors shards and the extra heads."""
    from safetensors.torch import load_file

    final = run_dir / "final"
    weights = {f"heads.{k}": v for k, v in load_file(final / "mtp_heads.safetensors").items()}
    for shard in sorted(final.glob("model*.safetensors")):
        weights.update(load_file(shard))
    return weights
