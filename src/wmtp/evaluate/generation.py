"""Sampling completions for benchmark problems with the model's head 0 (Hugging Face `generate`, KV cache).

Batching: the (problem, sample) jobs are sorted by prompt length, longest first (so a batch that does not fit
fails at once), cut into batches of at most `batch_size` whose prompts are within a factor 2 of each other (no
row is more than half padding), left-padded. Rows
that finish early are padded until the batch's last row stops, so larger batches pay for their longest row;
on CPUs in bfloat16 a step costs about the same for 1 or 32 rows, so large batches win (README, "Real model").

Stop sequences are checked incrementally: each step decodes only the last few tokens of each unfinished row
(`StopOnSequences`), not the whole continuation, so checking costs the same at token 10 and token 400.

Chat prompts (`Sampling.prompt_format == "chat"`): each prompt is `chat_message(prompt)` in the tokenizer's chat
template; a row stops at the end of its turn (eos) or once the reply's first code block is closed
(`StopAfterCodeBlock`, also incremental); the completion is `completion_from_reply(reply)` and the record keeps
the reply under `reply`.

Prompts start as training rows do (`data.bos_prefix`: a bos token exactly when the tokenizer itself adds one);
chat prompts start as their template writes them. A prompt that leaves fewer than `max_new_tokens` of the model's
positions keeps its last tokens (the completion continues its end), with one warning on stderr that says how
many were cut (`fit_to_positions`).

Determinism: greedy decoding depends on the batch (padding changes the arithmetic slightly), sampling on the
seed; both depend only on the seed, the batch size and the device, not on the number of processes: batch b is
sampled with seed (seed, b), and under torchrun rank r generates batches r, r + W, r + 2W, ... of the same
partition (`rank`, `world_size`), so the merged file equals one process's.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..config import ConfigError
from ..data.sequences import bos_prefix
from ..execution.problems import STOP, Problem, chat_message, code_block_closed, completion_from_reply, truncate_at_stop
from .settings import Sampling


class StopOnSequences(StoppingCriteria):
    """Marks a row done once its continuation contains one of its stop sequences; done rows stay done.

    Each call decodes only a row's last `window` tokens, enough to hold any stop sequence: every token decodes
    to at least one byte, so a stop sequence of L bytes that has just been completed lies in the last L tokens
    (two more cover a decoder that drops a leading space or a partial character at the window's start). A stop
    sequence therefore is found in the step that completes it, as decoding the whole continuation would find it.
    """

    def __init__(self, tokenizer, prompt_length: int, stops: list[list[str]]) -> None:
        self.tokenizer, self.prompt_length, self.stops = tokenizer, prompt_length, stops
        self.window = max((len(s.encode("utf-8")) for row in stops for s in row), default=0) + 2
        self.done = torch.zeros(len(stops), dtype=torch.bool)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        rows = [i for i in range(len(self.stops)) if not self.done[i] and self.stops[i]]
        if rows:
            start = max(self.prompt_length, input_ids.shape[1] - self.window)
            tails = self.tokenizer.batch_decode(input_ids[rows, start:].tolist(), skip_special_tokens=True)
            for row, text in zip(rows, tails, strict=True):
                self.done[row] = any(s in text for s in self.stops[row])
        return self.done.to(input_ids.device)


class StopAfterCodeBlock(StoppingCriteria):
    """Marks a row done once its reply has opened a code block and closed it again: the reply holds a fence and,
    after it, a fence at the start of a line (`code_block_closed`); done rows stay done.

    Incremental: each row's reply is kept as text, completed lines plus the tokens of the current line, so each
    call decodes only the tokens since the row's last newline (a line is appended once its text ends in a
    newline, when no partial character can be pending)."""

    def __init__(self, tokenizer, prompt_length: int, rows: int) -> None:
        self.tokenizer = tokenizer
        self.lines = [""] * rows  # completed lines of each reply
        self.anchor = [prompt_length] * rows  # first token of each reply's current line
        self.done = torch.zeros(rows, dtype=torch.bool)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        for row in range(len(self.lines)):
            if self.done[row]:
                continue
            tail = self.tokenizer.decode(input_ids[row, self.anchor[row]:].tolist(), skip_special_tokens=True)
            self.done[row] = code_block_closed(self.lines[row] + tail)
            if tail.endswith("\n"):
                self.lines[row] += tail
                self.anchor[row] = input_ids.shape[1]
        return self.done.to(input_ids.device)


def chat_inputs(tokenizer, problems: list[Problem]) -> list[list[int]]:
    """Token ids of each problem's chat prompt (the instruction and the prompt as the user's turn, then the
    template's assistant header)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("--prompt-format chat: the tokenizer has no chat template (use --prompt-format raw)")
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": chat_message(p.prompt)}], tokenize=False,
                                           add_generation_prompt=True) for p in problems]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def raw_inputs(tokenizer, problems: list[Problem]) -> list[list[int]]:
    """Token ids of each problem's raw prompt, started as training rows are (`data.bos_prefix`)."""
    bos = bos_prefix(tokenizer)
    return [bos + tokenizer(p.prompt, add_special_tokens=False)["input_ids"] for p in problems]


def fit_to_positions(encoded: list[list[int]], positions: int | None,
                     max_new_tokens: int) -> tuple[list[list[int]], int]:
    """(prompts, how many were cut): each prompt cut to its last `positions − max_new_tokens` tokens, so prompt and
    completion fit the model's positions (past them a model errs or degrades); the end is kept because the
    completion continues it. `positions` None (no limit known): unchanged."""
    if positions is None:
        return encoded, 0
    room = positions - max_new_tokens
    if room < 1:
        raise ConfigError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's {positions} "
                          "positions (max_position_embeddings); lower it")
    return [ids[-room:] for ids in encoded], sum(len(ids) > room for ids in encoded)


def make_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Job indices cut into batches: sorted by length, longest first, at most `batch_size` per batch, and a new
    batch whenever the next prompt is shorter than half the batch's longest, so no row carries more padding than
    prompt (one 3,700-token MBPP prompt would otherwise pad 31 rows of ~300 tokens to its length)."""
    order = sorted(range(len(lengths)), key=lambda j: (-lengths[j], j))
    batches: list[list[int]] = []
    for j in order:
        if batches and len(batches[-1]) < batch_size and 2 * lengths[j] >= lengths[batches[-1][0]]:
            batches[-1].append(j)
        else:
            batches.append([j])
    return batches


def batch_seed(seed: int, index: int) -> int:
    """The torch seed of batch `index` of a run with seed `seed` (distinct for distinct pairs, below 2**63)."""
    return (seed * 1_000_003 + index) % (2**63)


def _generated_lengths(rows: torch.Tensor, pad: int, eos: int | None) -> list[int]:
    """Tokens each row generated before it finished: up to and including its first eos, else until the first pad
    that follows only pads (the row was stopped by a stop sequence and padded), else all of them."""
    lengths = []
    for row in rows.tolist():
        n = len(row)
        if eos is not None and eos in row:
            n = row.index(eos) + 1
        else:
            while n and row[n - 1] == pad:
                n -= 1
        lengths.append(n)
    return lengths


@torch.inference_mode()
def generate_samples(model, tokenizer, problems: list[Problem], sampling: Sampling, *, device: torch.device,
                     model_name: str = "", rank: int = 0, world_size: int = 1,
                     stats: dict | None = None, progress: Callable[[str], None] | None = None) -> list[dict]:
    """One generations record per (problem, sample) of this rank's batches (all of them with one process), in
    problem order (see execution.py for the format). `stats`, when given, receives `generated_tokens` (tokens
    generated by this rank, padding excluded), `batches` and `seconds`; `progress` gets a line per batch."""
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    chat = sampling.prompt_format == "chat"
    positions = getattr(model.config, "max_position_embeddings", None)
    encoded, cut = fit_to_positions(chat_inputs(tokenizer, problems) if chat else raw_inputs(tokenizer, problems),
                                    positions, sampling.max_new_tokens)
    if cut and rank == 0:
        print(f"wmtp: warning: {cut} of {len(problems)} prompts are longer than the model's {positions} positions "
              f"minus --max-new-tokens {sampling.max_new_tokens}: each keeps its last "
              f"{positions - sampling.max_new_tokens} tokens", file=sys.stderr, flush=True)
    jobs = [(index, i) for index in range(len(problems)) for i in range(sampling.n)]
    batches = make_batches([len(encoded[index]) for index, _ in jobs], sampling.batch_size)
    settings = {**asdict(sampling), "model": model_name}
    sample_args = ({"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p}
                   if sampling.temperature > 0 else {"do_sample": False})
    records: dict[int, dict] = {}
    generated = 0
    started = time.monotonic()
    for b, batch in enumerate(batches):
        if b % world_size != rank:
            continue
        rows = [encoded[jobs[j][0]] for j in batch]
        width = max(len(ids) for ids in rows)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in rows], device=device)
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in rows], device=device)
        stops = (StopAfterCodeBlock(tokenizer, width, len(batch)) if chat else
                 StopOnSequences(tokenizer, width, [STOP[problems[jobs[j][0]].benchmark] for j in batch]))
        torch.manual_seed(batch_seed(sampling.seed, b))
        out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=sampling.max_new_tokens,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                             stopping_criteria=StoppingCriteriaList([stops]), top_k=None, **sample_args)
        generated += sum(_generated_lengths(out[:, width:], pad, tokenizer.eos_token_id))
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        if progress is not None:
            elapsed = time.monotonic() - started
            progress(f"generation: batch {b + 1}/{len(batches)} (rank {rank}), {generated} tokens in {elapsed:.0f} s "
                     f"({generated / elapsed:.1f} tokens/s)")
        for j, text in zip(batch, texts, strict=True):
            problem, i = problems[jobs[j][0]], jobs[j][1]
            completion = completion_from_reply(text) if chat else truncate_at_stop(text, STOP[problem.benchmark])
            records[j] = {"benchmark": problem.benchmark, "task_id": problem.task_id, "sample": i,
                          "prompt": problem.prompt, "completion": completion, "tests": problem.tests,
                          "generation": settings, **({"reply": text} if chat else {})}
    if stats is not None:
        stats.update(generated_tokens=generated, batches=len(batches[rank::world_size]),
                     seconds=time.monotonic() - started)
    return [records[j] for j in sorted(records)]
