"""A tiny Critic-WMTP set-up on a marker corpus (words, half the documents with MARK): what the critic tests
and its key checks share."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from wmtp.config import Config, Recipe
from wmtp.runtime.distributed import DistInfo
from wmtp.training.build import prepare

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


WORDS = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta", "zeta", "lambda"]


def corpus(path: Path, n: int = 400, seed: int = 0) -> Path:
    """Documents of 6-14 words; every other one holds the word MARK somewhere after the first word. The label
    (the reward) is 1 exactly when MARK is there."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
        if i % 2 == 0:
            words.insert(rng.randint(1, len(words) - 1), "MARK")
        lines.append(json.dumps({"text": " ".join(words), "label": int(i % 2 == 0)}) + "\n")
    path.write_text("".join(lines))
    return path


def setup_for(tmp_path: Path, critic: dict | None = None, pretrain: dict | bool | None = None,
              train: dict | None = None, optim_lr: float = 1e-5, validation_fraction: float = 0.1):
    data = corpus(tmp_path / "marker.jsonl") if not (tmp_path / "marker.jsonl").exists() else tmp_path / "marker.jsonl"
    config = Config.model_validate({
        "model": {"from_scratch": {"hidden_size": 64, "num_layers": 2, "num_attention_heads": 4,
                                   "num_key_value_heads": 2, "intermediate_size": 128,
                                   "max_position_embeddings": 128},
                  "train_tokenizer": {"vocab_size": 300, "min_frequency": 2}},
        "datasets": {"marker": str(data)}, "output_dir": str(tmp_path / "runs"),
        "compute": {"device": "cpu", "seed": 0}, "checkpoint": {"keep_last": 3},
        "mlflow": {"enabled": False}, "logging": {"progress": False, "log_every": 1}})
    recipe = Recipe.model_validate({
        "algorithm": "critic",
        "critic": {"reward": {"kind": "labels"}, "value_hidden": 64, **(critic or {})},
        **({} if pretrain is False else {"pretrain": {"max_steps": 150, "lr": 3e-3, "eval_every": 50,
                                                      "early_stopping": "none", **(pretrain or {})}}),
        "mtp": {"n_heads": 3},
        "data": {"train": [{"kind": "jsonl", "dataset": "marker"}], "validation_fraction": validation_fraction,
                 "max_length": 32,
                 "packing": False},
        "optim": {"lr": optim_lr},  # 1e-5: stage 2 barely moves the trunk, the checks read stage 1's value function
        "train": {"micro_batch_size": 16, "max_steps": 1, **(train or {})}})
    return prepare(config, recipe, CPU)
