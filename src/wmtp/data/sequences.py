"""Sequences: tokenisation ([bos as the tokenizer adds it] + prompt + completion + eos), packing or padding into
[N, max_length] rows, per-head labels, a deterministic order per epoch, and a byte-level BPE tokenizer trained
on the texts."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError, DataSettings
from ..loss import mtp_labels
from .sources import Example


# --------------------------------------------------------------------------------------------- tensors
@dataclass
class SequenceSet:
    """Fixed-length training sequences, all [N, L]: token ids, 1 on real tokens, the packed document of each
    token, and True on prompt tokens. `doc_examples` [D]: the index (in the input list) of each document id."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    document_ids: torch.Tensor
    prompt_mask: torch.Tensor
    doc_examples: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name)[index] for name in
                ("input_ids", "attention_mask", "document_ids", "prompt_mask")}

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


def labels_for(batch: dict[str, torch.Tensor], n_heads: int, mask_prompt: bool) -> torch.Tensor:
    """Per-head labels [B, S, n] of a batch of sequences (`SequenceSet.select`): prompt tokens are excluded as
    targets when mask_prompt (docs/method.md §1)."""
    return mtp_labels(batch["input_ids"], n_heads, attention_mask=batch["attention_mask"],
                      document_ids=batch["document_ids"], prompt_mask=batch["prompt_mask"] if mask_prompt else None)


def bos_prefix(tokenizer) -> list[int]:
    """What the tokenizer itself puts before a text: [bos] when `tokenizer(text)` starts with its bos token (Llama,
    Mistral: `add_bos_token` or a post-processor), else [] (GPT-2, SmolLM2, Qwen, whose `<|endoftext|>` may be
    named bos but is not added; a tokenizer without a bos token).

    One rule for every sequence a model starts reading: training rows (`tokenize_examples`), GRPO rollout prompts,
    evaluation prompts and the speculative statistics' prompts, so each is read as the model was trained on and
    as the standard harness, which encodes prompts with the tokenizer's defaults, reads it. Chat prompts are the
    exception: their chat template writes whatever bos it wants into the text."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    return [bos] if tokenizer("x")["input_ids"][:1] == [bos] else []


def tokenize_examples(examples: list[Example], tokenizer) -> list[tuple[list[int], int]]:
    """(token ids, number of prompt tokens) per example: `bos_prefix` + prompt + completion + [eos]."""
    bos = bos_prefix(tokenizer)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if not eos:
        raise ConfigError("the tokenizer has no eos token: documents could not be separated")
    prompts = tokenizer([ex.prompt for ex in examples], add_special_tokens=False)["input_ids"]
    completions = tokenizer([ex.completion for ex in examples], add_special_tokens=False)["input_ids"]
    return [(bos + p + c + eos, len(bos) + len(p)) for p, c in zip(prompts, completions, strict=True)]


def build_sequences(documents: list[tuple[list[int], int]], max_length: int, *, packing: bool, pad_id: int,
                    seed: int) -> SequenceSet:
    """Shuffle documents deterministically, then pack them into [N, max_length] (a document may continue into
    the next row) or truncate and right-pad each one to max_length."""
    order = torch.randperm(len(documents), generator=torch.Generator().manual_seed(seed)).tolist()
    rows: list[tuple[list[int], list[int], list[bool]]] = []
    if packing:
        ids: list[int] = []
        docs: list[int] = []
        prompt: list[bool] = []
        for doc_index, i in enumerate(order):
            tokens, n_prompt = documents[i]
            ids += tokens
            docs += [doc_index] * len(tokens)
            prompt += [True] * n_prompt + [False] * (len(tokens) - n_prompt)
        for start in range(0, len(ids), max_length):
            rows.append((ids[start:start + max_length], docs[start:start + max_length],
                         prompt[start:start + max_length]))
    else:
        for doc_index, i in enumerate(order):
            tokens, n_prompt = documents[i]
            tokens = tokens[:max_length]
            rows.append((tokens, [doc_index] * len(tokens), [j < n_prompt for j in range(len(tokens))]))
    n = len(rows)
    input_ids = torch.full((n, max_length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, max_length), dtype=torch.long)
    document_ids = torch.full((n, max_length), -1, dtype=torch.long)
    prompt_mask = torch.zeros((n, max_length), dtype=torch.bool)
    for r, (ids_row, doc_row, prompt_row) in enumerate(rows):
        k = len(ids_row)
        input_ids[r, :k] = torch.tensor(ids_row)
        attention_mask[r, :k] = 1
        document_ids[r, :k] = torch.tensor(doc_row)
        prompt_mask[r, :k] = torch.tensor(prompt_row)
    return SequenceSet(input_ids, attention_mask, document_ids, prompt_mask, torch.tensor(order, dtype=torch.long))


def recipe_sequences(examples: list[Example], tokenizer, settings: DataSettings, seed: int) -> SequenceSet:
    """The sequences a recipe's data settings make of `examples` (tokenised, packed or truncated, padded)."""
    return build_sequences(tokenize_examples(examples, tokenizer), settings.max_length, packing=settings.packing,
                           pad_id=pad_token_id(tokenizer), seed=seed)


def pad_token_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the sequences in one epoch: a fixed permutation per (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def train_bpe_tokenizer(texts: list[str], vocab_size: int, min_frequency: int):
    """A byte-level BPE tokenizer trained on `texts` (no download), with `<|endoftext|>` as bos/eos and a pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|pad|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=specials[0], eos_token=specials[0],
                                   pad_token=specials[1])
