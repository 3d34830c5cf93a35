"""Offline cache of Rho-1's reference CE (docs/method.md §5.2: it does not depend on the trained model).

`wmtp score-reference` scores every training sequence once and writes `ref[N, S]` (the reference's CE of
each target token) to the config's `reference_cache` file, with a fingerprint of the training sequences,
the tokenizer and the reference's weight files. Training with that config reads the file instead of running
the reference; any fingerprint mismatch is an error, never a silent reuse.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ...config import ConfigError
from ...data.fingerprint import digest_of, sequence_bytes, tokenizer_bytes
from ...data.sequences import SequenceSet

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".gguf")


def reference_files_digest(path: str) -> str:
    """sha256 over a local reference's config and weight files (a GGUF file, or a model directory)."""
    location = Path(path)
    if not location.exists():
        raise ConfigError(f"reference_cache needs a local reference_model.path (a directory or GGUF file), got {path}")
    files = [location] if location.is_file() else sorted(
        p for p in location.iterdir() if p.suffix in _WEIGHT_SUFFIXES or p.name == "config.json")
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def fingerprint(train_set: SequenceSet, tokenizer, reference_path: str) -> str:
    return digest_of([*sequence_bytes(train_set), tokenizer_bytes(tokenizer),
                      reference_files_digest(reference_path).encode()])


def write_cache(path: Path, ref: torch.Tensor, key: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        save_file({"reference_ce": ref.contiguous().cpu()}, tmp, metadata={"fingerprint": key})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_cache(path: Path, key: str) -> torch.Tensor:
    if not path.is_file():
        raise ConfigError(f"reference_cache {path}: not found; create it with `wmtp score-reference`")
    with safe_open(str(path), framework="pt") as handle:
        stored = (handle.metadata() or {}).get("fingerprint")
        if stored != key:
            raise ConfigError(f"reference_cache {path}: its fingerprint does not match this run's training data, "
                              "tokenizer and reference weights; run `wmtp score-reference` again")
        return handle.get_tensor("reference_ce")
