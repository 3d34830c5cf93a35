"""A frozen reference language model: loading it (sharing the trained model's tokenizer, checked), and its
cross-entropy of every target token, ref[j] = −log p_R(x_j | x_<j) (docs/method.md §5.2). Rho-1 scores the
excess loss against it; GRPO's KL term compares the trained head 0 with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..data.sequences import SequenceSet

if TYPE_CHECKING:
    from .rho1.settings import ReferenceSource

# texts both tokenizers must split alike: code, prose, whitespace, non-ASCII
PROBE_STRINGS = ("def f(x):\n    return x + 1\n", "Hello, world!", "  \t\n", "import numpy as np", "ünïcødé 文字 🙂")


def reference_target_ce(ref_logits: torch.Tensor, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ref[b, j] = −log p_R(x_j | x_<j) for every target token j ≥ 1, in fp32; 0 where undefined (j = 0, padding).

    ref_logits: [B, S, V], the reference's logits on input_ids [B, S]; logits at t score x[t+1].
    """
    batch, seq = input_ids.shape
    out = torch.zeros(batch, seq, dtype=torch.float32, device=input_ids.device)
    if seq < 2:
        return out
    ce = F.cross_entropy(ref_logits[:, :-1].float().reshape(-1, ref_logits.shape[-1]), input_ids[:, 1:].reshape(-1),
                         reduction="none").view(batch, seq - 1)
    if attention_mask is not None:
        both_real = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
        ce = torch.where(both_real, ce, torch.zeros((), device=ce.device))
    out[:, 1:] = ce
    return out


def reference_target_ce_chunked(hidden: torch.Tensor, unembedding: torch.nn.Linear, input_ids: torch.Tensor,
                                attention_mask: torch.Tensor | None = None, chunk_size: int = 256) -> torch.Tensor:
    """`reference_target_ce` from the reference's last hidden states [B, S, D] and its (plain) unembedding,
    `chunk_size` positions at a time: peak memory ~ chunk_size x V instead of the [B, S, V] logits."""
    batch, seq = input_ids.shape
    out = torch.zeros(batch, seq, dtype=torch.float32, device=input_ids.device)
    if seq < 2:
        return out
    flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = input_ids[:, 1:].reshape(-1)
    ce = torch.empty(targets.shape[0], dtype=torch.float32, device=input_ids.device)
    for start in range(0, targets.shape[0], chunk_size):
        logits = unembedding(flat[start:start + chunk_size]).float()
        ce[start:start + chunk_size] = F.cross_entropy(logits, targets[start:start + chunk_size], reduction="none")
    ce = ce.view(batch, seq - 1)
    if attention_mask is not None:
        both_real = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
        ce = torch.where(both_real, ce, torch.zeros((), device=ce.device))
    out[:, 1:] = ce
    return out


def check_tokenizers_compatible(trained, reference, where: str = "reference_model") -> None:
    """The reference must score the same token ids: same vocabulary size, probe ids and special tokens."""
    if len(trained) != len(reference):
        raise ValueError(f"{where}: tokenizer has {len(reference)} tokens, the trained model's has {len(trained)}")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        a, b = getattr(trained, name, None), getattr(reference, name, None)
        if a != b:
            raise ValueError(f"{where}: {name} is {b}, the trained model's is {a}")
    for probe in PROBE_STRINGS:
        a = trained(probe, add_special_tokens=False)["input_ids"]
        b = reference(probe, add_special_tokens=False)["input_ids"]
        if a != b:
            raise ValueError(f"{where}: tokenizes {probe!r} as {b[:8]}…, the trained model as {a[:8]}…")


def load_reference(source: ReferenceSource | None, tokenizer, device: torch.device,
                   load_weights: bool = True) -> torch.nn.Module | None:
    """The reference: frozen, in eval mode, in `dtype`, checked to share the trained model's tokenizer (only the
    check when its CEs come from the cache)."""
    from ..model.build import load_tokenizer_from, resolve_model_path, secret
    from ..model.mtp import load_causal_lm  # transformers: imported when a run is built, not when a recipe is read
    from ..runtime.precision import DTYPES

    if source is None:
        raise ConfigError("algorithm rho1 needs config `reference_model` with a `path` (hub id, directory or GGUF)")
    token = secret(source.hf_token)
    key = "reference_model.tokenizer" if source.tokenizer else "reference_model.path"
    reference_tokenizer = load_tokenizer_from(source.tokenizer or source.path, token, key)
    try:
        check_tokenizers_compatible(tokenizer, reference_tokenizer)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not load_weights:
        return None
    try:
        model = load_causal_lm(resolve_model_path(source.path, "reference_model.path"), dtype=DTYPES[source.dtype],
                               token=token)
    except OSError as exc:
        raise ConfigError(f"reference_model.path {source.path}: {str(exc).splitlines()[0]}") from exc
    model.requires_grad_(False)
    return model.eval().to(device)


@torch.no_grad()
def score_reference_batch(reference: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          autocast, chunk_size: int = 256) -> torch.Tensor:
    """The reference's CE of every target token of a batch: [B, S] (see `reference_target_ce`). With a plain
    unembedding the logits are computed `chunk_size` positions at a time, never [B, S, V] at once; a reference
    that transforms its logits (soft-capping, scaling) goes through its own full forward."""
    from ..model.mtp import check_plain_unembedding

    try:
        check_plain_unembedding(reference.config)
    except ValueError:
        with autocast:
            logits = reference(input_ids=input_ids, attention_mask=attention_mask).logits
        return reference_target_ce(logits, input_ids, attention_mask)
    with autocast:
        hidden = reference.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return reference_target_ce_chunked(hidden, reference.get_output_embeddings(), input_ids, attention_mask,
                                           chunk_size)


def score_reference_set(reference: torch.nn.Module, sequences: SequenceSet, batch_size: int, autocast,
                        device: torch.device, chunk_size: int = 256) -> torch.Tensor:
    """Reference CEs of every sequence of a set, [N, S] fp32 on the CPU (what `wmtp score-reference` caches)."""
    out = torch.zeros(sequences.input_ids.shape, dtype=torch.float32)
    for start in range(0, len(sequences), batch_size):
        index = torch.arange(start, min(start + batch_size, len(sequences)))
        batch = {k: v.to(device) for k, v in sequences.select(index).items()}
        out[index] = score_reference_batch(reference, batch["input_ids"], batch["attention_mask"], autocast,
                                           chunk_size).cpu()
    return out
