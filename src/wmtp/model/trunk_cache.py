"""An offline cache of the frozen trunk's states, for training only the extra heads (`mtp.trainable: heads`).

With the base model frozen, what the heads read from the trunk is a fixed function of each sequence, so
`wmtp cache-states` runs the trunk once over the training and validation sequences and training reads the states
instead of running the trunk (docs/heads-cache.md). Per sequence it stores
(`TrunkStates`): `final`, the trunk's output after its final norm (head 0's state, linear heads' and sequential
depth 1's input), and for transformer heads `z`, the last decoder layer's input. The last layer's other arguments
(causal mask, rotary embeddings, position ids) are recomputed from the batch's attention mask
(`MTPModel.last_layer_arguments`), and sequential depths embed their shifted tokens with the frozen table.

The file is one safetensors file, written row block by row block and read by memory map (a micro-batch reads its
own rows only): tensors `<split>.<state>` [N, S, D] in the model's dtype, for split `train` and `validation`, and
in the header's metadata the format, the head type and a fingerprint of what the states depend on, each part
separately (`fingerprint_parts`), so that a mismatch names what differs.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError
from ..data.fingerprint import digest_of, sequence_bytes, tensor_bytes, tokenizer_bytes
from ..data.sequences import SequenceSet
from .mtp import MTPModel, TrunkStates

FORMAT = "wmtp-trunk-states/1"
SPLITS = ("train", "validation")
_DTYPES = {torch.float32: ("F32", np.float32), torch.bfloat16: ("BF16", np.uint16),
           torch.float16: ("F16", np.float16)}


def state_names(head_type: str) -> tuple[str, ...]:
    """The states stored per token: `final` always, `z` for transformer heads."""
    return ("final", "z") if head_type == "transformer" else ("final",)


@dataclass(frozen=True)
class CachePlan:
    """The tensors of a cache: name -> [N, S, D], all in `dtype`."""

    shapes: dict[str, tuple[int, int, int]]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """tokens × D × bytes per value × states, over both splits."""
        size = torch.tensor([], dtype=self.dtype).element_size()
        return sum(n * s * d * size for n, s, d in self.shapes.values())

    def describe(self) -> str:
        rows = {split: next((shape for name, shape in self.shapes.items() if name.startswith(split)), None)
                for split in SPLITS}
        states = sorted({name.split(".", 1)[1] for name in self.shapes})
        counts = " + ".join(f"{shape[0]} {split}" for split, shape in rows.items() if shape is not None)
        n, s, d = next(iter(self.shapes.values()))
        return (f"{counts} sequences x {s} tokens x {d} x {torch.tensor([], dtype=self.dtype).element_size()} "
                f"bytes ({str(self.dtype).removeprefix('torch.')}) x {len(states)} states ({', '.join(states)}) "
                f"= {self.nbytes / 2**20:.1f} MiB")


def plan_cache(model: MTPModel, sets: dict[str, SequenceSet | None], dtype: torch.dtype) -> CachePlan:
    hidden = model.unembedding.weight.shape[1]
    shapes = {f"{split}.{state}": (len(seqs), seqs.input_ids.shape[1], hidden)
              for split, seqs in sets.items() if seqs is not None for state in state_names(model.mtp_config.head_type)}
    return CachePlan(shapes, dtype)


def fingerprint_parts(model: MTPModel, sets: dict[str, SequenceSet | None], tokenizer, dtype: torch.dtype,
                      precision: str) -> dict[str, str]:
    """What the cached states depend on, one digest or value per part: the training and validation sequences
    (token ids, attention mask), the tokenizer's vocabulary, the base model's tensors (the frozen trunk and head 0,
    whatever file or seed they came from), the head type, the stored dtype and the forward's precision."""
    parts = {f"{split}_sequences": digest_of(sequence_bytes(seqs)) if seqs is not None else "none"
             for split, seqs in sets.items()}
    return {**parts, "tokenizer": digest_of([tokenizer_bytes(tokenizer)]),
            "model_weights": digest_of(tensor_bytes(model.base.state_dict())),
            "head_type": model.mtp_config.head_type, "dtype": str(dtype).removeprefix("torch."), "precision": precision}


def _header(plan: CachePlan, metadata: dict[str, str]) -> bytes:
    name = _DTYPES[plan.dtype][0]
    size = torch.tensor([], dtype=plan.dtype).element_size()
    entries, offset = {}, 0
    for tensor, shape in plan.shapes.items():
        nbytes = shape[0] * shape[1] * shape[2] * size
        entries[tensor] = {"dtype": name, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps({"__metadata__": metadata, **entries}).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_states(path: Path, model: MTPModel, sets: dict[str, SequenceSet | None], fingerprint: dict[str, str], *,
                 batch_size: int, device: torch.device, autocast: AbstractContextManager | None = None,
                 announce: Callable[[str], None] = print) -> CachePlan:
    """Run the frozen trunk over every sequence of `sets` and write the cache to `path` (atomically: a temp file
    beside it, renamed when complete). The size is announced first; a cache larger than the free disk space is
    refused before anything runs."""
    dtype = next(model.base.parameters()).dtype
    plan = plan_cache(model, sets, dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path.parent).free
    announce(f"trunk cache {path}: {plan.describe()}")
    if plan.nbytes > free:
        raise ConfigError(f"{path}: the trunk cache needs {plan.nbytes / 2**30:.2f} GiB, {path.parent} has "
                          f"{free / 2**30:.2f} GiB free")
    header = _header(plan, {"format": FORMAT, **fingerprint})
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(header)
            out.truncate(len(header) + plan.nbytes)
        model.eval()
        for split, seqs in sets.items():
            if seqs is None:
                continue
            arrays = _memmaps(tmp, header, plan, split, mode="r+")
            for first in range(0, len(seqs), batch_size):
                rows = torch.arange(first, min(first + batch_size, len(seqs)))
                batch = seqs.select(rows)
                with torch.no_grad(), autocast or nullcontext():
                    states = model.trunk_states(batch["input_ids"].to(device), batch["attention_mask"].to(device))
                for state, array in arrays.items():
                    value = getattr(states, state).to(dtype).cpu().contiguous()
                    array[first:first + len(rows)] = value.view(torch.uint16 if dtype == torch.bfloat16
                                                                else dtype).numpy()
            for array in arrays.values():
                array.flush()
            del arrays
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return plan


def _memmaps(path, header: bytes, plan: CachePlan, split: str, mode: str) -> dict[str, np.memmap]:
    np_dtype = _DTYPES[plan.dtype][1]
    size = torch.tensor([], dtype=plan.dtype).element_size()
    arrays, offset = {}, len(header)
    for tensor, shape in plan.shapes.items():
        if tensor.startswith(f"{split}."):
            arrays[tensor.split(".", 1)[1]] = np.memmap(path, dtype=np_dtype, mode=mode, offset=offset, shape=shape)
        offset += shape[0] * shape[1] * shape[2] * size
    return arrays


class TrunkStateCache:
    """A cache file opened for reading, checked against the run: its format, its fingerprint part by part, the
    shapes the run needs and the file's size (a truncated file is refused)."""

    def __init__(self, path: Path, expected: dict[str, str], shapes: CachePlan) -> None:
        self.path = path
        if not path.is_file():
            raise ConfigError(f"trunk_cache {path}: not found; create it with `wmtp cache-states`")
        header = self._read_header(path)
        metadata = header.pop("__metadata__", {})
        if metadata.get("format") != FORMAT:
            raise ConfigError(f"trunk_cache {path}: not a trunk-state cache (format {metadata.get('format')!r}, "
                              f"expected {FORMAT!r})")
        differ = [part for part, value in expected.items() if metadata.get(part) != value]
        if differ:
            raise ConfigError(f"trunk_cache {path}: written for other {', '.join(differ)} than this run's; run "
                              "`wmtp cache-states` again")
        entries = header
        dtype_names = {entry["dtype"] for entry in entries.values()}
        if set(entries) != set(shapes.shapes) or dtype_names != {_DTYPES[shapes.dtype][0]} or any(
                tuple(entries[name]["shape"]) != shape for name, shape in shapes.shapes.items()):
            raise ConfigError(f"trunk_cache {path}: holds {sorted(entries)} in {sorted(dtype_names)}, this run reads "
                              f"{sorted(shapes.shapes)} in {_DTYPES[shapes.dtype][0]}; run `wmtp cache-states` again")
        expected_size = self._header_size + max(entry["data_offsets"][1] for entry in entries.values())
        if path.stat().st_size != expected_size:
            raise ConfigError(f"trunk_cache {path}: {path.stat().st_size} bytes, its header says {expected_size}; "
                              "the file is damaged or incomplete")
        self.plan = shapes
        self._arrays = {split: self._maps(entries, split) for split in SPLITS}

    def _read_header(self, path: Path) -> dict:
        try:
            with open(path, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                if length > path.stat().st_size:
                    raise ValueError("header longer than the file")
                header = json.loads(handle.read(length))
        except (struct.error, ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"trunk_cache {path}: cannot read its header ({exc}); the file is damaged or not a "
                              "trunk-state cache") from None
        self._header_size = 8 + length
        return header

    def _maps(self, entries: dict, split: str) -> dict[str, np.memmap]:
        np_dtype = _DTYPES[self.plan.dtype][1]
        return {name.split(".", 1)[1]: np.memmap(self.path, dtype=np_dtype, mode="r",
                                                 offset=self._header_size + entry["data_offsets"][0],
                                                 shape=tuple(entry["shape"]))
                for name, entry in entries.items() if name.startswith(f"{split}.")}

    def states(self, split: str, rows: torch.Tensor, device: torch.device) -> TrunkStates:
        """The cached states of sequences `rows` [B] of `split`: each [B, S, D] on `device`."""
        arrays = self._arrays[split]
        if not arrays:
            raise ConfigError(f"trunk_cache {self.path}: holds no {split} states")
        values = {}
        for state, array in arrays.items():
            block = torch.from_numpy(np.ascontiguousarray(array[rows.cpu().numpy()]))
            values[state] = (block.view(torch.bfloat16) if self.plan.dtype == torch.bfloat16 else block).to(device)
        return TrunkStates(**values)
