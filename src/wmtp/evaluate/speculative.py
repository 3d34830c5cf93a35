"""Self-speculative greedy decoding with the MTP heads (docs/method.md §6).

One step: the draft heads 1…k propose k tokens from the last accepted position at once; the next forward runs
the base model over [last token, draft 1, …, draft k] with its KV cache, and head 0 (the base model) verifies
them: the longest prefix of drafts equal to head 0's greedy choice is accepted, plus head 0's own token after
it, so every forward yields at least one token and the output is the base model's greedy output. The same
forward gives the next drafts: the heads read the trunk state at the last accepted position, so no extra
trunk pass is needed.

Caches. The base model keeps an HF `DynamicCache`. A transformer head is a decoder layer that attends over
its own keys and values of earlier positions, so each one keeps its own `DynamicCache`, fed with the same
positions as the base cache; both always hold the same length, which lets a head reuse the attention mask and
rotary embeddings the base model built for its last layer (captured by a forward pre-hook, as
`MTPModel.head_hidden_states` does). The heads run on every position of the verify forward (their caches
need the accepted ones, and which are accepted is known only after head 0's logits); then every cache is
cropped back to the accepted length. Linear heads read the base model's final hidden state and keep no cache.

Limits: greedy only; batch size 1 (sequences in a batch accept different numbers of drafts, so their caches
would go ragged); no attention mask or padding; attention-only decoders (the caches are plain `DynamicCache`s,
which can be cropped back; a state-space or linear-attention layer's state cannot). The output equals ordinary
greedy decoding up to floating-point near-ties: head 0 scores k+1 positions in one forward where `generate`
scores one, and a near-tie (likelier in bf16) can round the other way.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..model import MTPModel, _decoder_parts


@dataclass
class SpeculativeResult:
    """The new tokens and how they were obtained.

    tokens: the generated token ids, prompt excluded, at most `max_new_tokens`, ending at the first eos.
    forward_passes: forwards of the base model, the prompt's (prefill) forward included; ordinary decoding
        takes one per token.
    proposed[h-1], accepted[h-1]: draft head h's drafts that were verified, and those accepted. Draft h of a
        step counts only when drafts 1…h-1 of that step were all accepted (otherwise it is discarded unseen),
        so `acceptance_rates[h-1]` is P(draft h accepted | drafts before it accepted): the product of the
        first h rates is the chance that a step gets past draft h.
    """

    tokens: list[int]
    forward_passes: int
    proposed: list[int]
    accepted: list[int]

    @property
    def acceptance_rates(self) -> list[float]:
        """Per draft head h = 1…k: accepted / proposed (0.0 where nothing was proposed)."""
        return [a / p if p else 0.0 for a, p in zip(self.accepted, self.proposed, strict=True)]

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per forward pass: len(tokens) / forward_passes (1.0 for ordinary decoding)."""
        return len(self.tokens) / self.forward_passes if self.forward_passes else 0.0


class _Forward:
    """Forwards of the base model and the first k draft heads over new positions, with their KV caches; batch 1."""

    def __init__(self, model: MTPModel, n_draft: int) -> None:
        self.model = model
        self.heads = list(model.heads[:n_draft])
        self.transformer = model.mtp_config.head_type == "transformer"
        if self.transformer:
            self.inner, layers, self.norm = _decoder_parts(model.base)
            self.last_layer = layers[-1]
        else:
            self.inner = model.base.base_model
        # transformers 5 renamed the decoder's `past_key_values` argument to `cache`; accept either release.
        self.cache_arg = "cache" if "cache" in inspect.signature(self.inner.forward).parameters else "past_key_values"
        self.cache = DynamicCache()
        self.head_caches = [DynamicCache() for _ in self.heads]
        self.head_input: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [1, q], the positions after those in the caches; every cache grows by q positions.

        Returns the base model's final hidden state [q, D] (head 0's logits are its unembedding), and keeps
        what `drafts` needs: the transformer heads' final hidden states [k, q, D], or for linear heads their
        input, the base model's final hidden state.
        """
        kwargs = {"input_ids": input_ids, "use_cache": True, self.cache_arg: self.cache}
        if not self.transformer or not self.heads:
            final = self.inner(**kwargs).last_hidden_state[0]
            self.head_input = final
            return final
        captured: dict = {}

        def capture(_module, args, kwargs):
            captured["args"], captured["kwargs"] = args, kwargs

        handle = self.last_layer.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            final = self.inner(**kwargs).last_hidden_state[0]
        finally:
            handle.remove()
        hidden = []
        for head, head_cache in zip(self.heads, self.head_caches, strict=True):
            # The head gets the last layer's own inputs (trunk state, mask, rotary embeddings) with its own
            # cache in place of the base model's; it runs on every new position to fill that cache.
            def swap(value, head_cache=head_cache):
                return head_cache if value is self.cache else value

            h = head(*(swap(v) for v in captured["args"]), **{k: swap(v) for k, v in captured["kwargs"].items()})
            hidden.append(self.norm(h[0] if isinstance(h, tuple) else h)[0])
        self.head_input = torch.stack(hidden)
        return final

    def drafts(self, position: torch.Tensor) -> torch.Tensor:
        """The draft heads' greedy tokens [k] at `position` ([1], an index into the last call's positions)."""
        if not self.heads:
            return position.new_empty(0)
        if self.transformer:
            hidden = self.head_input.index_select(1, position)[:, 0]
        else:
            z = self.head_input.index_select(0, position)
            hidden = torch.cat([head(z) for head in self.heads])
        return self.model.unembedding(hidden).argmax(-1)  # [k, D] -> [k]

    def drop_last(self, n: int) -> None:
        """Forget the last n positions of every cache (rejected drafts)."""
        if not n:
            return
        for cache in (self.cache, *self.head_caches):
            for layer in cache.layers:
                # A head's cache also holds empty layers below its own index, which some transformers releases
                # (5.17) cannot crop; a negative count removes that many positions.
                if layer.get_seq_length():
                    layer.crop(-n)


@torch.inference_mode()
def speculative_generate(model: MTPModel, input_ids: torch.Tensor, max_new_tokens: int,
                         eos_token_id: int | None = None, n_draft: int | None = None) -> SpeculativeResult:
    """Greedy decoding where heads 1…n_draft draft and head 0 verifies; same tokens as greedy `generate`.

    input_ids: [1, S] prompt (batch size 1 only, no padding). Stops after `max_new_tokens` tokens or at
    `eos_token_id` (included in the tokens); None: no eos stop. n_draft: draft heads to use (default all,
    n_heads - 1; 0 is ordinary decoding through the same loop). Runs in eval mode and inference mode; the
    train/eval mode of every module is restored afterwards.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise ValueError(f"speculative_generate decodes one sequence: input_ids must be [1, S] with S >= 1, got "
                         f"shape {tuple(input_ids.shape)} (batch size 1 only: run prompts one by one)")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    n_draft = model.n_heads - 1 if n_draft is None else n_draft
    if not 0 <= n_draft <= model.n_heads - 1:
        raise ValueError(f"n_draft must be in 0…{model.n_heads - 1} (the model's draft heads), got {n_draft}")
    result = SpeculativeResult([], 0, [0] * n_draft, [0] * n_draft)
    if max_new_tokens == 0:
        return result
    # Restored module by module: a wrapper's flag can differ from its base model's (from_base on an eval model).
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        _decode(model, input_ids.to(model.unembedding.weight.device), max_new_tokens, eos_token_id, n_draft, result)
    finally:
        for module, training in modes.items():
            module.training = training
    return result


def _decode(model: MTPModel, prompt: torch.Tensor, max_new_tokens: int, eos_token_id: int | None, n_draft: int,
            result: SpeculativeResult) -> None:
    forward = _Forward(model, n_draft)
    step_input, drafts = prompt, prompt.new_empty(0)  # the prefill forward is a step with no drafts
    tokens = result.tokens
    while True:
        final = forward(step_input)
        result.forward_passes += 1
        # Position `last` holds the newest accepted token; head 0 there predicts the token after it, which
        # drafts[0] claims, and so on: drafts are accepted while they equal head 0's greedy choices.
        last = step_input.shape[1] - 1 - drafts.numel()
        greedy = model.unembedding(final[last:]).argmax(-1)  # [k + 1]
        n_accepted = (greedy[:-1] == drafts).cumprod(0).sum()
        # The next drafts come from the last accepted position; queued before the step's one host sync.
        next_drafts = forward.drafts(last + n_accepted.view(1))
        n_accepted_int, *greedy_tokens = torch.cat([n_accepted.view(1), greedy]).tolist()
        emitted = greedy_tokens[:n_accepted_int + 1]
        for h in range(min(n_accepted_int + 1, drafts.numel())):
            result.proposed[h] += 1
            result.accepted[h] += h < n_accepted_int
        forward.drop_last(drafts.numel() - n_accepted_int)
        done = False
        if eos_token_id is not None and eos_token_id in emitted:
            emitted, done = emitted[:emitted.index(eos_token_id) + 1], True
        tokens.extend(emitted)
        remaining = max_new_tokens - len(tokens)
        if done or remaining <= 0:
            return
        # Never draft past max_new_tokens: a step emits at most its drafts + 1 tokens.
        drafts = next_drafts[:remaining - 1]
        step_input = torch.cat([greedy[n_accepted_int].view(1), drafts]).unsqueeze(0)
