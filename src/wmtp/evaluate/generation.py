"""Sampling completions for benchmark problems with the model's head 0 (Hugging Face `generate`, KV cache).

Batched over (problem, sample) pairs with left padding; temperature 0 is greedy (then n must be 1); each
completion is cut at the benchmark's first stop sequence. Deterministic given the seed, batch size and device.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..execution.problems import STOP, Problem, truncate_at_stop
from .settings import Sampling


class _StopOnSequences(StoppingCriteria):
    """Done when every row's continuation contains one of its stop sequences (checked on decoded text)."""

    def __init__(self, tokenizer, prompt_length: int, stops: list[list[str]]) -> None:
        self.tokenizer, self.prompt_length, self.stops = tokenizer, prompt_length, stops

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:], skip_special_tokens=True)
        done = [any(s in text for s in stops) for text, stops in zip(texts, self.stops, strict=True)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@torch.inference_mode()
def generate_samples(model, tokenizer, problems: list[Problem], sampling: Sampling, *, device: torch.device,
                     model_name: str = "") -> list[dict]:
    """One generations record per (problem, sample), in problem order (see execution.py for the format)."""
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    jobs = [(p, i) for p in problems for i in range(sampling.n)]
    settings = {**asdict(sampling), "model": model_name}
    torch.manual_seed(sampling.seed)
    records = []
    for start in range(0, len(jobs), sampling.batch_size):
        batch = jobs[start:start + sampling.batch_size]
        encoded = [tokenizer(p.prompt, add_special_tokens=False)["input_ids"] for p, _ in batch]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=device)
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
        sample_args = ({"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p}
                       if sampling.temperature > 0 else {"do_sample": False})
        stops = StoppingCriteriaList([_StopOnSequences(tokenizer, width, [STOP[p.benchmark] for p, _ in batch])])
        out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=sampling.max_new_tokens,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, stopping_criteria=stops,
                             top_k=None, **sample_args)
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        for (problem, i), text in zip(batch, texts, strict=True):
            records.append({"benchmark": problem.benchmark, "task_id": problem.task_id, "sample": i,
                            "prompt": problem.prompt, "completion": truncate_at_stop(text, STOP[problem.benchmark]),
                            "tests": problem.tests, "generation": settings})
    return records
