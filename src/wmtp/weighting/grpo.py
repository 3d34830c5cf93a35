"""Group-relative weights (`algorithm: grpo`, after Shao et al., 2024; docs/method.md §5.6): the model trains on its
own samples, each weighted by how much better it scored than the other samples of its prompt.

A rollout (every `rollout_every` optimizer steps; the steps in between train on the same rollout again):
1. this rank's prompts of the rollout (below), `micro_batch_size / group_size` per micro-batch;
2. G = `group_size` completions per prompt from head 0 (the base model's own `generate` with its KV cache, eval
   mode, no gradient), one `generate` call per micro-batch with left-padded prompts. Each row draws its tokens
   itself, with temperature and nucleus (top-p) filtering, by the inverse CDF of its own seeded uniforms
   (`sample_tokens`), so a completion depends on the model, its prompt and its seed, never on the rows it was
   batched with;
3. rewards from `grpo.reward` (`wmtp.weighting.rewards`, as the critic's) on Example(prompt, decoded completion)
   with the source example's source, key and meta, so `verifiable` runs that example's own tests;
4. advantages per group: A_i = (r_i − mean)/(std + eps), the population std; a group whose rewards are all equal
   (zero variance) gets A = 0: nothing in it is better or worse than the rest.
Training rows are [bos] + prompt + completion (up to its first eos, included), right-padded, so each token has the
position it had when it was generated; labels exclude the prompt (`mtp_labels(prompt_mask=...)`). Every valid pair
of completion i gets weight A_i, on every head; prompt targets and padding get 0. Below-average completions have
negative weights, so the scheme sets `allow_negative` and needs `loss.reduction: token_mean`.

KL to the starting model (`kl_coef` β > 0): a frozen copy of the initial base model (head 0) scores each sampled
token once per rollout. In each training forward, head 0's own hidden states give ℓ = −log π_θ(y) on its pairs
before the loss is taken (`weights_in_forward`), and with d = log π_ref(y) − log π_θ(y) the k3 estimate of
KL(π_θ‖π_ref) is e^d − d − 1 ≥ 0. Its gradient is (e^d − 1)·∇ℓ, so head 0's weight gets β·(e^d − 1) added: the
weighted CE then has the gradient of A·ℓ + β·k3 at the current parameters. The value and the gradient estimate
different divergences (docs/method.md §5.6): E[k3] = KL(π_θ‖π_ref) (what `grpo/kl` reports), but E[∇k3] =
∇KL(π_ref‖π_θ); both only for tokens drawn from π_θ itself, i.e. at temperature 1 and top_p 1, on a rollout's
first step. The fused loss keeps no logits to differentiate a separate `auxiliary_loss` through, which would cost
a second forward and backward per micro-batch; the weight costs one chunked CE of head 0 without gradient.

Prompts. The usable prompts are the distinct prompts of the training examples (first occurrence, training order)
whose [bos] + prompt fits in data.max_length − max_new_tokens tokens; P of them. Rollout r draws world_size ×
per_rank prompts, per_rank = grad_accum_steps × micro_batch_size / group_size: rank k's slot j is draw
g = (r·world_size + k)·per_rank + j, which takes prompt epoch_order(P, data.shuffle_seed, g // P)[g % P] (a fixed
permutation per pass over the prompts; each rank its own consecutive slice, rank-major like the data's
micro-batches). Sample i of draw g uses the uniforms seeded by (compute.seed, g, i). One process with the same
global batch (micro-batches twice as large) therefore samples the same prompts and, for the same model, the same
completions.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass

import torch
from pydantic import Field, model_validator

from ..config import ConfigError, Strict
from ..data.sequences import bos_prefix, epoch_order, pad_token_id
from ..data.sources import Example
from ..loss import IGNORE_INDEX, fused_linear_mtp_ce, mtp_labels, per_target_to_heads
from ..runtime import distributed as dist_utils
from .base import SchemeContext, SchemePlugin, StepBatch, WeightingScheme
from .reference import score_reference_batch
from .rewards import RewardFn, RewardSettings, make_reward

ADVANTAGE_BINS = 40
ADVANTAGE_MAX = 4.0  # histogram range [−4, 4]; advantages outside are counted in the end bins
KL_LOG_RATIO_MAX = 20.0  # |log π_ref/π_θ| is clipped here so that e^d, and the weight, stay finite


class GRPOSettings(Strict):
    """Recipe section `grpo`: completions sampled from the model, weighted by their advantage within their group."""

    reward: RewardSettings
    group_size: int = Field(
        8, ge=2, description="G, completions sampled per prompt; a micro-batch holds micro_batch_size / G prompts "
        "(Shao et al. use 64; 8 is TRL's default)")
    rollout_every: int = Field(
        1, ge=1, description="optimizer steps per rollout: the steps in between train on the same samples again, "
        "with no importance ratio (1: every step on fresh samples of the current model)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the rollouts (with kl_coef > 0: "
                               "the k3 estimate and its gradient are unbiased only at temperature 1 and top_p 1)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling: the smallest set of tokens with this "
                         "probability mass (1: all tokens; with kl_coef > 0: the k3 estimate and its gradient are "
                         "unbiased only at temperature 1 and top_p 1)")
    max_new_tokens: int = Field(256, ge=1, description="tokens per completion at most (its eos included)")
    eps: float = Field(1e-4, ge=0, description="A = (r − mean)/(std + eps) per group, population std")
    kl_coef: float = Field(
        0.0, ge=0, description="β of the k3 KL estimate to the starting model on head 0 (0: no KL term, no "
        "reference copy). Its value estimates KL(π_θ‖π_ref), its gradient is that of KL(π_ref‖π_θ), both "
        "unbiased only at temperature 1 and top_p 1 (docs/method.md §5.6)")

    @model_validator(mode="after")
    def _reward_of_completions(self) -> GRPOSettings:
        if self.reward.kind == "labels":
            raise ValueError("reward.kind labels is the dataset's label of a document, not a score of a sampled "
                             "completion: every completion of a group would get the same reward (use verifiable, "
                             "reward_model or function)")
        return self


class GRPORecipe(Strict):
    """The recipe section algorithm grpo owns."""

    grpo: GRPOSettings


# ------------------------------------------------------------------------------------------------- the math
def group_advantages(rewards: torch.Tensor, group_size: int, eps: float) -> torch.Tensor:
    """A_i = (r_i − mean)/(std + eps) within each group of `group_size` consecutive rewards, std the population std,
    float64; 0 for every member of a group whose rewards are all equal. rewards: [N], N a multiple of group_size."""
    r = rewards.double().view(-1, group_size)
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, unbiased=False, keepdim=True)
    equal = r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)
    return torch.where(equal, torch.zeros_like(r), (r - mean) / (std + eps)).view(-1)


def completion_weights(advantages: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Detached fp32 weights [B, S, n]: row b's advantage on every valid pair (its completion's targets, every head),
    0 elsewhere. advantages: [B]; labels: [B, S, n]."""
    a = advantages.detach().to(device=labels.device, dtype=torch.float32).view(-1, 1, 1).expand(labels.shape)
    return torch.where(labels != IGNORE_INDEX, a, torch.zeros((), device=labels.device))


def kl_weights(model_ce: torch.Tensor, reference_ce: torch.Tensor, valid: torch.Tensor,
               kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Head 0's KL term. model_ce, reference_ce: [B, S], −log π(y) of each pair's sampled target under the current
    and the reference model; valid: [B, S]. With d = model_ce − reference_ce = log π_ref(y) − log π_θ(y) (clipped to
    ±KL_LOG_RATIO_MAX): returns (β·(e^d − 1), the weight whose CE gradient is β·∇k3; k3 = e^d − d − 1), both [B, S]
    fp32 and 0 off valid pairs."""
    d = (model_ce.float() - reference_ce.float()).clamp(-KL_LOG_RATIO_MAX, KL_LOG_RATIO_MAX)
    zero = torch.zeros((), device=d.device)
    return torch.where(valid, kl_coef * torch.expm1(d), zero), torch.where(valid, torch.expm1(d) - d, zero)


def sample_tokens(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row [B] from logits [B, V] and one uniform in [0, 1) per row [B]: softmax(logits / T),
    restricted to the smallest set of most probable tokens whose mass reaches top_p (ties in a stable order), drawn
    by the inverse CDF of the uniform over that set in descending order."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    if top_p < 1.0:
        sorted_p = torch.where(sorted_p.cumsum(-1) - sorted_p < top_p, sorted_p, torch.zeros((), device=probs.device))
    cdf = sorted_p.cumsum(-1)
    pick = torch.searchsorted(cdf, (uniforms.to(cdf) * cdf[:, -1])[:, None], right=True).squeeze(1)
    pick = torch.minimum(pick, (sorted_p > 0).sum(-1) - 1)  # rounding at the end of the CDF
    return order.gather(1, pick[:, None]).squeeze(1)


def row_uniforms(seed: int, draw: int, sample: int, length: int) -> torch.Tensor:
    """The uniforms [length] of sample `sample` of prompt draw `draw`: one per generated position."""
    key = hashlib.sha256(f"wmtp-grpo/{seed}/{draw}/{sample}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)
    return torch.rand(length, generator=generator, dtype=torch.float64)


class _RowSampler:
    """A logits processor for greedy `generate`: draws each row's next token with `sample_tokens` and that row's
    uniform of this position, and returns scores that are 0 at the drawn token and −inf elsewhere, so the argmax
    emits it. Sampling inside `generate` would draw from one generator for the whole batch, and a row's tokens would
    depend on the rows it was batched with."""

    def __init__(self, uniforms: torch.Tensor, prompt_width: int, temperature: float, top_p: float) -> None:
        self.uniforms, self.prompt_width, self.temperature, self.top_p = uniforms, prompt_width, temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        position = input_ids.shape[1] - self.prompt_width
        token = sample_tokens(scores, self.uniforms[:, position], self.temperature, self.top_p)
        return torch.full_like(scores, -math.inf).scatter_(1, token[:, None], 0.0)


@torch.no_grad()
def sample_completions(model, prompts: list[list[int]], uniforms: torch.Tensor, *, temperature: float, top_p: float,
                       max_new_tokens: int, pad_id: int, eos_id: int, device: torch.device,
                       autocast) -> list[list[int]]:
    """Each prompt row's completion ids (up to and including its first eos; at most max_new_tokens) from the model's
    head 0, in eval mode, prompts left-padded. prompts: token ids per row; uniforms: [rows, max_new_tokens]."""
    from transformers import GenerationConfig, LogitsProcessorList

    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    # A fresh generation config: the model's own sampling defaults (top_k, temperature, ...) do not apply.
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                              eos_token_id=eos_id)
    sampler = _RowSampler(uniforms.to(device), width, temperature, top_p)
    was_training = model.training
    model.eval()
    try:
        with autocast:
            out = model.generate(input_ids=input_ids, attention_mask=attention, generation_config=config,
                                 logits_processor=LogitsProcessorList([sampler]))
    finally:
        model.train(was_training)
    completions = []
    for row in out[:, width:].tolist():
        completions.append(row[:row.index(eos_id) + 1] if eos_id in row else row)
    return completions


def rollout_batch(prompts: list[list[int]], completions: list[list[int]], rows: torch.Tensor, n_heads: int,
                  pad_id: int, device: torch.device) -> tuple[StepBatch, torch.Tensor]:
    """Training rows [bos] + prompt + completion, right-padded to the longest, with labels on completion targets only
    (document ids 0 on real tokens, −1 on padding); and the prompt mask [B, S]. rows: [B], each row's source
    example."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    prompt_mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for b, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        input_ids[b, :len(p) + len(c)] = torch.tensor(p + c)
        attention_mask[b, :len(p) + len(c)] = 1
        prompt_mask[b, :len(p)] = True
    prompt_mask = prompt_mask.to(device)
    return batch_from_rows(input_ids.to(device), attention_mask.to(device), prompt_mask, rows, n_heads), prompt_mask


def batch_from_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_mask: torch.Tensor,
                    rows: torch.Tensor, n_heads: int) -> StepBatch:
    """A rollout micro-batch from its rows: labels on the targets that are real and not prompt tokens."""
    labels = mtp_labels(input_ids, n_heads, attention_mask=attention_mask, prompt_mask=prompt_mask)
    return StepBatch(input_ids, attention_mask, labels, rows, torch.where(attention_mask.bool(), 0, -1))


def usable_prompts(examples: list[Example], tokenizer, room: int) -> tuple[list[int], list[list[int]]]:
    """(index in `examples`, [bos] + prompt ids) of the first example of each distinct prompt, in order, whose ids
    number 1 … room."""
    bos = bos_prefix(tokenizer)  # as training rows start (data.bos_prefix)
    first: dict[str, int] = {}
    for i, ex in enumerate(examples):
        first.setdefault(ex.prompt, i)
    chosen = list(first.values())
    encoded = tokenizer([examples[i].prompt for i in chosen], add_special_tokens=False)["input_ids"] if chosen else []
    kept = [(i, bos + ids) for i, ids in zip(chosen, encoded, strict=True) if 1 <= len(bos) + len(ids) <= room]
    return [i for i, _ in kept], [ids for _, ids in kept]


def advantage_histogram(advantages: torch.Tensor) -> torch.Tensor:
    """Counts [ADVANTAGE_BINS] of advantages over [−ADVANTAGE_MAX, ADVANTAGE_MAX], the outside counted at the ends."""
    values = advantages.double().clamp(-ADVANTAGE_MAX, ADVANTAGE_MAX)
    return torch.histc(values, bins=ADVANTAGE_BINS, min=-ADVANTAGE_MAX, max=ADVANTAGE_MAX).cpu()


# ---------------------------------------------------------------------------------------------- the scheme
@dataclass
class Rollout:
    """This rank's samples of one rollout: its micro-batches with their prompt masks [B, S], each row's advantage [B]
    per micro-batch, and with a KL term the reference's CE of every target token [B, S] per micro-batch (as
    `score_reference_batch` gives it)."""

    index: int
    batches: list[StepBatch]
    prompt_masks: list[torch.Tensor]
    advantages: list[torch.Tensor]
    reference_ce: list[torch.Tensor] | None
    metrics: dict[str, float]


class GRPOWeighting(WeightingScheme):
    """Trains on rollouts (`step_batches`) with per-completion group advantages as weights (`step_weights`)."""

    allow_negative = True  # below-average completions (docs/method.md §3, §5.6)

    def __init__(self, settings: GRPOSettings, context: SchemeContext, prompt_rows: list[int],
                 prompt_ids: list[list[int]], reward: RewardFn, reference: torch.nn.Module | None) -> None:
        self.settings, self.info, self.reward = settings, context.info, reward
        self.model, self.wrapped, self.autocast = context.model, context.wrapped, context.autocast
        self.tokenizer, self.examples = context.tokenizer, context.train_examples
        self.prompt_rows, self.prompt_ids, self.reference = prompt_rows, prompt_ids, reference
        plan = context.plan
        self.micro_batches, self.per_micro_batch = plan.grad_accum_steps, plan.micro_batch_size // settings.group_size
        self.chunk_size, self.shuffle_seed, self.seed = plan.chunk_size, plan.shuffle_seed, context.config.compute.seed
        self.pad_id, self.eos_id = pad_token_id(context.tokenizer), context.tokenizer.eos_token_id
        self.rollout: Rollout | None = None
        self.last_step = -1
        self._orders: dict[int, torch.Tensor] = {}
        self._step_metrics: dict[str, float] = {}
        self._kl_sums = torch.zeros(2, dtype=torch.float64, device=self.info.device)  # Σ k3, pairs
        self.histogram: torch.Tensor | None = None  # advantage counts over the run's rollouts, all ranks

    # rollouts -------------------------------------------------------------------------------------------------
    def prompt_of_draw(self, draw: int) -> int:
        """Index in the usable prompts of global draw `draw` (a fixed permutation per pass over the prompts)."""
        epoch, within = divmod(draw, len(self.prompt_ids))
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(len(self.prompt_ids), self.shuffle_seed, epoch)}
        return int(self._orders[epoch][within])

    def step_batches(self, step: int, batches: list[StepBatch]) -> list[StepBatch]:
        """The micro-batches of rollout step // rollout_every (sampled when it is new); the data's are not used."""
        index = step // self.settings.rollout_every
        if self.rollout is None or self.rollout.index != index:
            self.rollout = self.sample(index)
        self.last_step = step
        return self.rollout.batches

    def sample(self, index: int) -> Rollout:
        """Rollout `index` of this rank: sample, score, standardise within groups (module docstring)."""
        s, info, group = self.settings, self.info, self.settings.group_size
        per_rank = self.micro_batches * self.per_micro_batch
        first = (index * info.world_size + info.rank) * per_rank
        parts, masks, examples = [], [], []
        for m in range(self.micro_batches):
            draws = range(first + m * self.per_micro_batch, first + (m + 1) * self.per_micro_batch)
            prompts = [self.prompt_of_draw(g) for g in draws for _ in range(group)]
            uniforms = torch.stack([row_uniforms(self.seed, g, i, s.max_new_tokens) for g in draws
                                    for i in range(group)])
            completions = sample_completions(
                self.model, [self.prompt_ids[p] for p in prompts], uniforms, temperature=s.temperature,
                top_p=s.top_p, max_new_tokens=s.max_new_tokens, pad_id=self.pad_id, eos_id=self.eos_id,
                device=info.device, autocast=self.autocast)
            for p, completion in zip(prompts, completions, strict=True):
                source = self.examples[self.prompt_rows[p]]
                text = self.tokenizer.decode(completion, skip_special_tokens=True)
                examples.append(Example(source.prompt, text, source.source, source.key, source.meta))
            rows = torch.tensor([self.prompt_rows[p] for p in prompts], dtype=torch.long)
            batch, prompt_mask = rollout_batch([self.prompt_ids[p] for p in prompts], completions, rows,
                                               self.model.n_heads, self.pad_id, info.device)
            parts.append(batch)
            masks.append(prompt_mask)
        # one call for the whole rollout: the sandbox runs the programs in parallel
        rewards = torch.tensor(self.reward(examples), dtype=torch.float64)
        advantages = group_advantages(rewards, group, s.eps)
        size = self.per_micro_batch * group
        reference_ce = None
        if self.reference is not None:
            reference_ce = [score_reference_batch(self.reference, b.input_ids, b.attention_mask, self.autocast,
                                                  self.chunk_size) for b in parts]
        metrics = self.rollout_metrics(rewards, advantages, parts)
        return Rollout(index, parts, masks, list(advantages.float().split(size)), reference_ce, metrics)

    def rollout_metrics(self, rewards: torch.Tensor, advantages: torch.Tensor,
                        batches: list[StepBatch]) -> dict[str, float]:
        """Reward and advantage statistics of a rollout over all ranks; adds its advantages to the histogram."""
        r = rewards.view(-1, self.settings.group_size)
        equal = r.amax(dim=1) == r.amin(dim=1)
        tokens = sum(float((b.labels[..., 0] != IGNORE_INDEX).sum()) for b in batches)
        sums = torch.tensor([float(rewards.sum()), float(r.std(dim=1, unbiased=False).sum()), float(equal.sum()),
                             float(r.shape[0]), float(advantages.abs().sum()), tokens, float(rewards.numel())],
                            dtype=torch.float64, device=self.info.device)
        total, std, zero, groups, abs_a, tokens, count = dist_utils.all_reduce_sum(sums, self.info).tolist()
        histogram = dist_utils.all_reduce_sum(advantage_histogram(advantages).to(self.info.device), self.info).cpu()
        self.histogram = histogram if self.histogram is None else self.histogram + histogram
        return {"grpo/reward_mean": total / count, "grpo/reward_std": std / groups,
                "grpo/zero_variance_groups": zero / groups, "grpo/advantage_abs_mean": abs_a / count,
                "grpo/completion_tokens_mean": tokens / count}

    # weights --------------------------------------------------------------------------------------------------
    def step_weights(self, batches: list[StepBatch]) -> list[torch.Tensor | None]:
        """Each completion's advantage on its valid pairs; with a KL term the weights are made in the training
        forward instead (`weights_in_forward`), and this returns None for every micro-batch."""
        rollout = self.rollout
        if rollout is None or len(batches) != len(rollout.batches) or \
                any(b is not own for b, own in zip(batches, rollout.batches, strict=True)):
            raise RuntimeError("grpo weighs its own rollouts: pass the micro-batches its step_batches returned")
        if rollout.reference_ce is not None:
            self._kl_sums = torch.zeros(2, dtype=torch.float64, device=self.info.device)
            return [None for _ in batches]
        return [completion_weights(a, b.labels) for a, b in zip(rollout.advantages, batches, strict=True)]

    def weights_in_forward(self, index: int, batch: StepBatch):
        """With a KL term: the advantage weights plus head 0's β·(e^d − 1), with ℓ = −log π_θ taken from the training
        forward's own head-0 hidden states (no extra pass), d = ℓ − ℓ_ref."""
        rollout = self.rollout
        if rollout is None or rollout.reference_ce is None:
            return None
        if batch is not rollout.batches[index]:
            raise RuntimeError("grpo weighs its own rollouts: pass the micro-batches its step_batches returned")

        def weights_fn(hidden: list[torch.Tensor], model) -> torch.Tensor:
            head0 = batch.labels[..., :1]
            _, model_ce, _ = fused_linear_mtp_ce(hidden[:1], model.unembedding.weight, head0,
                                                 torch.zeros(head0.shape, device=head0.device),
                                                 bias=model.unembedding.bias, chunk_size=self.chunk_size)
            valid = head0[..., 0] != IGNORE_INDEX
            extra, k3 = kl_weights(model_ce[..., 0], per_target_to_heads(rollout.reference_ce[index], 1)[..., 0],
                                   valid, self.settings.kl_coef)
            weights = completion_weights(rollout.advantages[index], batch.labels)
            weights[..., 0] += extra
            self._kl_sums += torch.stack([k3.sum().double(), valid.sum().double()])
            return weights

        return weights_fn

    def after_backward(self, grad_clip: float | None) -> None:
        """`grpo/kl` (with a KL term): the step's mean k3 over head 0's pairs on all ranks, the estimate of the
        per-token KL(π_θ‖π_ref) on the sampled completions (not of KL(π_ref‖π_θ), whose gradient the term gives);
        unbiased only at temperature 1, top_p 1 and on a rollout's first step (docs/method.md §5.6)."""
        self._step_metrics = {}
        if self.rollout is not None and self.rollout.reference_ce is not None:
            k3_sum, count = dist_utils.all_reduce_sum(self._kl_sums.clone(), self.info).tolist()
            self._step_metrics["grpo/kl"] = k3_sum / max(count, 1.0)

    def metrics(self) -> dict[str, float]:
        return {**(self.rollout.metrics if self.rollout is not None else {}), **self._step_metrics}

    def artifacts(self) -> dict[str, str]:
        if self.histogram is None:
            return {}
        edges = torch.linspace(-ADVANTAGE_MAX, ADVANTAGE_MAX, ADVANTAGE_BINS + 1).tolist()
        return {"grpo_advantage_histogram.json": json.dumps({
            "bin_edges": edges, "note": "one count per sampled completion and rollout, all ranks; advantages "
            f"outside ±{ADVANTAGE_MAX} are counted in the end bins", "counts": self.histogram.tolist()})}

    # checkpoints ----------------------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The next step and the advantage histogram; and, when the next step reuses the current rollout (inside a
        rollout_every window), every rank's rollout, gathered to the checkpoint (rank 0 writes it): sampling it again
        from the resumed model would give other completions. At a rollout boundary the next step samples afresh."""
        state: dict = {"next_step": self.last_step + 1}
        if self.histogram is not None:
            state["histogram"] = self.histogram.tolist()
        rollout = self.rollout
        if rollout is None or (self.last_step + 1) // self.settings.rollout_every != rollout.index:
            return {}, state
        mine = {}
        for m, b in enumerate(rollout.batches):
            mine.update({f"mb{m}/input_ids": b.input_ids, f"mb{m}/attention_mask": b.attention_mask,
                         f"mb{m}/prompt_mask": rollout.prompt_masks[m], f"mb{m}/rows": b.rows,
                         f"mb{m}/advantages": rollout.advantages[m]})
            if rollout.reference_ce is not None:
                mine[f"mb{m}/reference_ce"] = rollout.reference_ce[m]
        mine = {k: v.detach().cpu().contiguous() for k, v in mine.items()}
        everyone = [mine]
        if self.info.distributed:
            everyone = [None] * self.info.world_size
            torch.distributed.all_gather_object(everyone, mine)
        tensors = {f"rollout/rank{k}/{name}": v for k, part in enumerate(everyone) for name, v in part.items()}
        state.update(rollout=rollout.index, world_size=self.info.world_size, micro_batches=len(rollout.batches),
                     metrics=rollout.metrics)
        return tensors, state

    def load_state(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        self.last_step = state["next_step"] - 1
        if "histogram" in state:
            self.histogram = torch.tensor(state["histogram"], dtype=torch.float64)
        if "rollout" not in state:
            return
        if state["world_size"] != self.info.world_size:
            raise ConfigError(f"grpo: this checkpoint was saved inside a rollout (grpo.rollout_every "
                              f"{self.settings.rollout_every}) by {state['world_size']} processes; resume it with as "
                              "many, or resume from a checkpoint at a multiple of rollout_every steps")
        device, prefix = self.info.device, f"rollout/rank{self.info.rank}/mb"
        batches, masks, advantages, reference = [], [], [], []
        for m in range(state["micro_batches"]):
            part = {k.removeprefix(f"{prefix}{m}/"): v for k, v in tensors.items() if k.startswith(f"{prefix}{m}/")}
            masks.append(part["prompt_mask"].to(device))
            batches.append(batch_from_rows(part["input_ids"].to(device), part["attention_mask"].to(device), masks[-1],
                                           part["rows"], self.model.n_heads))
            advantages.append(part["advantages"])
            if self.reference is not None:  # a checkpoint of a run without the KL term has no reference CEs
                reference.append(part["reference_ce"].to(device) if "reference_ce" in part else score_reference_batch(
                    self.reference, batches[-1].input_ids, batches[-1].attention_mask, self.autocast, self.chunk_size))
        self.rollout = Rollout(state["rollout"], batches, masks, advantages,
                               reference if self.reference is not None else None, state["metrics"])


# ------------------------------------------------------------------------------------------------ construction
def build(settings: GRPORecipe, context: SchemeContext) -> GRPOWeighting:
    """Check the recipe against the run (reduction, distribution, group size, prompt room), find the usable prompts,
    set up the reward and, with a KL term, the frozen copy of the starting base model."""
    s, recipe, info = settings.grpo, context.recipe, context.info
    where = recipe.source
    context.refuse_trunk_cache("grpo", "trains on completions it samples, which no cache holds")
    if recipe.loss.reduction != "token_mean":
        raise ConfigError(f"{where}: loss.reduction: algorithm grpo gives below-average completions negative weights, "
                          "which only token_mean accepts (docs/method.md §3); set loss.reduction: token_mean")
    if info.distributed and context.config.compute.distributed == "fsdp2":
        raise ConfigError(f"{context.config.source}: compute.distributed: algorithm grpo samples with the model's own "
                          "generate on each rank, which needs whole parameters; use ddp")
    if context.plan.micro_batch_size % s.group_size:
        raise ConfigError(f"{where}: grpo.group_size: {s.group_size} does not divide train.micro_batch_size "
                          f"{context.plan.micro_batch_size}; a micro-batch holds whole groups "
                          "(micro_batch_size / group_size prompts)")
    if context.tokenizer.eos_token_id is None:
        raise ConfigError("algorithm grpo: the tokenizer has no eos token to end a completion")
    room = recipe.data.max_length - s.max_new_tokens
    prompt_rows, prompt_ids = usable_prompts(context.train_examples, context.tokenizer, room)
    if not prompt_ids:
        raise ConfigError(f"{where}: grpo.max_new_tokens: no training prompt fits in data.max_length "
                          f"{recipe.data.max_length} − max_new_tokens {s.max_new_tokens} = {room} tokens ([bos] + "
                          "prompt)")
    reward = make_reward(s.reward, device=info.device)
    reference = None
    if s.kl_coef > 0:
        reference = copy.deepcopy(context.model.base).requires_grad_(False).eval()
    return GRPOWeighting(s, context, prompt_rows, prompt_ids, reward, reference)


PLUGIN = SchemePlugin(settings=GRPORecipe, build=build)
