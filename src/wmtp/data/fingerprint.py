"""Digests of what an offline cache was computed from, for the caches' fingerprints (Rho-1's reference CE,
docs/method.md §5.2; the frozen trunk's states, docs/heads-cache.md): the sequences, the tokenizer, a set of tensors.
A cache whose fingerprint differs from the run's is an error, never a silent reuse."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator

import torch

from .sequences import SequenceSet


def sequence_bytes(sequences: SequenceSet) -> Iterator[bytes]:
    """What a model's forward reads of the sequences: the token ids and the attention mask, as bytes."""
    yield sequences.input_ids.numpy().tobytes()
    yield sequences.attention_mask.numpy().tobytes()


def tokenizer_bytes(tokenizer) -> bytes:
    """The tokenizer's vocabulary (token -> id), canonical JSON."""
    return json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> Iterator[bytes]:
    """Each tensor's name, dtype, shape and raw bytes, in name order (any dtype, bfloat16 included)."""
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        yield f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode()
        yield tensor.reshape(-1).view(torch.uint8).numpy().tobytes()


def digest_of(parts: Iterable[bytes]) -> str:
    """sha256 over the parts in order."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()
