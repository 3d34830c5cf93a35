"""Self-speculative decoding with the MTP heads (docs/method.md §6): greedy or sampled, one row or a batch.

One step: the draft heads 1…k propose k tokens from the last accepted position; the next forward runs the base
model over [last token, draft 1, …, draft k] with its KV cache, and head 0 (the base model) verifies them, so
every forward yields at least one token. The same forward gives the next drafts: parallel heads (transformer,
linear) read the trunk state at the last accepted position, all at once; sequential depths draft one after
another from it (chain drafting, below). No extra trunk pass either way.

Verification:
- greedy (temperature 0): the longest prefix of drafts equal to head 0's greedy choices is accepted, plus head
  0's own token after it: the output is the base model's greedy output.
- sampling (temperature T > 0): speculative sampling (Leviathan et al. 2023; Chen et al. 2023). Draft j is
  sampled from head j's distribution q_j (logits / T) and accepted with probability min(1, p_j(x)/q_j(x)),
  p_j being head 0's distribution (logits / T) at that position given the drafts before it; at the first
  rejection the token is drawn from max(0, p_j − q_j) renormalised, and when every draft is accepted one more
  from head 0. Every emitted token then follows the base model's own distribution at temperature T, whatever
  the heads propose (the heads only change how many tokens a forward yields); a counting test checks it.

Batches. Rows accept different numbers of drafts, so their caches would go ragged. Instead every row keeps
every position in the caches; a row's rejected drafts are masked out of its attention mask, and each row gets
its own position ids (prompt length + tokens so far), so what a row attends to and its rotary positions are
those of decoding it alone. Positions rejected by every row are cropped from the caches, so one row never keeps
a masked position. Prompts are left-padded (masked the same way). A row that has finished keeps riding in the
batch until the last one finishes; its extra tokens are dropped.

Caches. The base model keeps an HF `DynamicCache`. A transformer head is a decoder layer that attends over
its own keys and values of earlier positions, so each one keeps its own `DynamicCache`, fed with the same
positions as the base cache; both always hold the same length, which lets a head reuse the attention mask,
position ids and rotary embeddings the base model built for its last layer (captured by a forward pre-hook,
as `MTPModel.head_hidden_states` does). The heads run on every position of the verify forward (their caches
need the accepted ones, and which are accepted is known only after head 0's logits). Linear heads read the base
model's final hidden state and keep no cache. Sequential depths keep a cache each too, filled after the verify
(chain drafting).

Chain drafting (sequential depths, docs/method.md §2.1 and §6). In training (teacher forcing) depth k at position
t reads (h_{k-1,t}, emb(x[t+k])) and predicts x[t+k+1]; its block attends over its own keys and values at the
positions s ≤ t, made from the inputs (h_{k-1,s}, emb(x[s+k])). At decoding, let x[m] be a row's newest token
(head 0's token from the last verify; the trunk has run up to position m-1). The drafts are read at position
m-1: depth 1 reads (h_{0,m-1}, emb(x[m])) and drafts d_1 for x[m+1]; depth k reads (h_{k-1,m-1}, emb(d_{k-1}))
and drafts d_k for x[m+k], each depth passing the next its own state (its first output). That is training's
computation at position m-1 on the sequence x̂ = x[0…m] d_1 … d_{k-1}, provided each depth's cache holds
training's entries for x̂: depth k's entry at position t reads emb(x̂[t+k]). For t ≤ m-k that token is accepted,
so the entry is final (committed) and is never recomputed; for m-k < t ≤ m-1 it is a draft of this step
(speculative: depth 1 has none, depth k has k-1). So after each verify every depth runs once, in depth order,
over the columns from the first one not committed to the newest (the verify forward's accepted columns and the
speculative ones before them; it needs depth k-1's states there and d_{k-1}), the draft is read at each row's
last column, and every depth cache is cut back to the columns committed for the deepest depth k used (t ≤
m-k) in every row. A rejected draft therefore never stays in a cache: its entries were speculative, and the next
step recomputes those positions with the accepted token; its own column is masked or cropped as in the base
cache. The drafts equal those of a whole-sequence forward over x̂ (tests/e2e/test_speculative.py checks the
states to 1e-5). Depth 1 reads the base model's final hidden states, kept from the verify forwards for the
columns not yet committed. Cost per step: k calls of one block over a few positions each (about k-1 plus the
accepted ones; decoding reads a block's weights once per call whatever that handful of positions), k one-row
unembeddings (depth k needs d_{k-1}), and one call of the base model stopped before its first layer, which
builds the depths' attention mask and rotary embeddings by the base model's own rules (so models whose layers
mix attention types are refused). Sampled, d_k comes from depth k's distribution given d_1 … d_{k-1}: a
proposal fixed when d_k is drawn, so the verification above is unchanged and stays lossless.

Limits: attention-only decoders (the caches are plain `DynamicCache`s that can be cropped and masked; a
state-space layer's state cannot). Greedy output equals ordinary greedy decoding up to floating-point
near-ties: head 0 scores k+1 positions in one forward where `generate` scores one, and a near-tie (likelier in
bf16) can round the other way.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..model.mtp import MTPModel, decoder_parts


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
    def acceptance_rates(self) -> list[float | None]:
        """Per draft head h = 1…k: accepted / proposed (None where nothing was proposed: not measured)."""
        return [a / p if p else None for a, p in zip(self.accepted, self.proposed, strict=True)]

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per forward pass: len(tokens) / forward_passes (1.0 for ordinary decoding)."""
        return len(self.tokens) / self.forward_passes if self.forward_passes else 0.0


class _Forward:
    """Forwards of the base model and the first k draft heads over new positions, with their KV caches."""

    chain = False

    def __init__(self, model: MTPModel, n_draft: int) -> None:
        self.model = model
        self.heads = list(model.heads[:n_draft])
        self.transformer = model.mtp_config.head_type == "transformer"
        if self.transformer:
            self.inner, layers, self.norm = decoder_parts(model.base)
            self.last_layer = layers[-1]
        else:
            self.inner = model.base.base_model
        # transformers 5 renamed the decoder's `past_key_values` argument to `cache`; accept either release.
        self.cache_arg = "cache" if "cache" in inspect.signature(self.inner.forward).parameters else "past_key_values"
        self.cache = DynamicCache()
        self.head_caches = [DynamicCache() for _ in self.heads]
        self.head_input: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor) -> torch.Tensor:
        """input_ids, position_ids: [B, q], the positions after those in the caches (every cache grows by q);
        attention_mask: [B, cached + q].

        Returns the base model's final hidden state [B, q, D] (head 0's logits are its unembedding), and keeps
        what `draft_hidden` needs: the transformer heads' final hidden states [k, B, q, D], or for linear heads
        their input, the base model's final hidden state.
        """
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                  "use_cache": True, self.cache_arg: self.cache}
        if not self.transformer or not self.heads:
            final = self.inner(**kwargs).last_hidden_state
            self.head_input = final
            return final
        captured: dict = {}

        def capture(_module, args, kwargs):
            captured["args"], captured["kwargs"] = args, kwargs

        handle = self.last_layer.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            final = self.inner(**kwargs).last_hidden_state
        finally:
            handle.remove()
        hidden = []
        for head, head_cache in zip(self.heads, self.head_caches, strict=True):
            # The head gets the last layer's own inputs (trunk state, mask, rotary embeddings) with its own
            # cache in place of the base model's; it runs on every new position to fill that cache.
            def swap(value, head_cache=head_cache):
                return head_cache if value is self.cache else value

            h = head(*(swap(v) for v in captured["args"]), **{k: swap(v) for k, v in captured["kwargs"].items()})
            hidden.append(self.norm(h[0] if isinstance(h, tuple) else h))
        self.head_input = torch.stack(hidden)
        return final

    def draft_hidden(self, start: int) -> torch.Tensor:
        """The draft heads' final hidden states [k, B, q - start, D] at the last call's positions start…q-1 (their
        unembedding gives the draft logits)."""
        if self.transformer:
            return self.head_input[:, :, start:]
        z = self.head_input[:, start:]  # [B, q - start, D]
        return torch.stack([head(z) for head in self.heads])

    def drop_last(self, n: int) -> None:
        """Forget the last n positions of every cache (drafts every row rejected)."""
        if not n:
            return
        for cache in (self.cache, *self.head_caches):
            for layer in cache.layers:
                # A head's cache also holds empty layers below its own index, which some transformers releases
                # (5.17) cannot crop; a negative count removes that many positions.
                if layer.get_seq_length():
                    layer.crop(-n)


class _LayerArguments(Exception):
    """Raised by the hook that captures a decoder layer's arguments, to stop the model before any layer runs."""


class _ChainForward:
    """Forwards of the base model, and the chain drafts of the first k sequential depths (module docstring).

    Keeps, besides the base model's cache: one `DynamicCache` per depth, holding the columns before `committed`
    (the same for every depth); the base model's final hidden state from that column on (`states`, what depth 1
    reads); the position id of every cached column; and each row's tokens by position (`tokens`, drafts written
    after the accepted ones).
    """

    chain = True

    def __init__(self, model: MTPModel, n_draft: int) -> None:
        self.model = model
        self.depths = list(model.heads[:n_draft])
        self.inner, layers, _ = decoder_parts(model.base)
        layer_types = getattr(model.config, "layer_types", None)
        if layer_types and len(set(layer_types)) > 1:
            raise ValueError(f"chain drafting builds the depths' attention masks as the first decoder layer gets "
                             f"them; {type(model.base).__name__} mixes layer types {sorted(set(layer_types))}")
        self.first_layer = layers[0]
        self.embed = model.base.get_input_embeddings()
        self.cache_arg = "cache" if "cache" in inspect.signature(self.inner.forward).parameters else "past_key_values"
        self.cache = DynamicCache()
        self.depth_caches = [DynamicCache() for _ in self.depths]
        self.committed = 0
        self.states: torch.Tensor | None = None  # [B, cached - committed, D]
        self.positions: torch.Tensor | None = None  # [B, cached]
        self.tokens: torch.Tensor | None = None  # [B, capacity]

    def start(self, prompts: list[list[int]], device: torch.device) -> None:
        """Each row's prompt tokens by position (0: its first token)."""
        width = max(len(p) for p in prompts)
        self.tokens = torch.tensor([p + [0] * (width - len(p)) for p in prompts], device=device)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor) -> torch.Tensor:
        """The base model's forward as `_Forward`'s; keeps the final hidden state and the positions."""
        final = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=True, **{self.cache_arg: self.cache}).last_hidden_state
        self.states = final if self.states is None else torch.cat([self.states, final], dim=1)
        self.positions = position_ids if self.positions is None else torch.cat([self.positions, position_ids], 1)
        return final

    def drop_last(self, n: int) -> None:
        """Forget the last n columns of the base model's cache (the depth caches end before them)."""
        if not n:
            return
        for layer in self.cache.layers:
            if layer.get_seq_length():
                layer.crop(-n)
        self.states, self.positions = self.states[:, :-n], self.positions[:, :-n]

    def record(self, start: torch.Tensor, values: torch.Tensor) -> None:
        """Write values [B, q] at positions start[b] + 0…q-1 of each row's tokens."""
        end = int((start + values.shape[1]).max())
        if end > self.tokens.shape[1]:
            grow = max(end - self.tokens.shape[1], self.tokens.shape[1])
            self.tokens = torch.cat([self.tokens, self.tokens.new_zeros(self.tokens.shape[0], grow)], dim=1)
        self.tokens.scatter_(1, start[:, None] + torch.arange(values.shape[1], device=values.device), values)

    def draft(self, mask: torch.Tensor, newest: torch.Tensor, choose) -> tuple[list, list]:
        """The chain drafts of every row: depth j = 1…k drafts x[newest + j] at the row's last cached position.

        mask: [B, cached], each row's columns (rejected ones 0); newest: [B], the position of each row's newest
        token (head 0's, already in `tokens`, not yet in the base cache). choose(logits [B, V]) → (tokens [B],
        probabilities [B, V] or None). Returns the k drafts and their probabilities, depth by depth.
        """
        cached = mask.shape[1]
        begin = self.committed
        columns = mask[:, begin:].bool()
        positions = self.positions[:, begin:]
        # The last column each row attends to holds its position newest - 1: the drafts are read there.
        last = cached - 1 - begin - columns.flip(1).long().argmax(1)
        rows = torch.arange(mask.shape[0], device=mask.device)
        arguments = self.layer_arguments(mask, positions, begin)
        state, drafts, probs = self.states, [], []
        for k, (depth, depth_cache) in enumerate(zip(self.depths, self.depth_caches, strict=True), start=1):
            ids = self.tokens.gather(1, torch.where(columns, positions + k, 0))
            args, kwargs = arguments(depth_cache)
            state, normed = depth(state, self.embed(ids), *args, **kwargs)
            token, prob = choose(self.model.unembedding(normed[rows, last]))
            self.record(newest + k, token[:, None])
            drafts.append(token)
            probs.append(prob)
        # Depth k's entry at position t is final once x[t+k] is known, t ≤ newest - k, for every depth used.
        pending = columns & (positions > newest[:, None] - len(self.depths))
        first_pending = torch.where(pending.any(1), pending.long().argmax(1), cached - begin)
        keep = begin + int(first_pending.min())
        for depth_cache in self.depth_caches:
            for layer in depth_cache.layers:
                if layer.get_seq_length() > keep:
                    layer.crop(keep - layer.get_seq_length())
        self.states = self.states[:, keep - begin:]
        self.committed = keep
        return drafts, probs

    def layer_arguments(self, mask: torch.Tensor, positions: torch.Tensor, past: int):
        """The arguments the base model gives a decoder layer (attention mask, rotary embeddings, cache) for the
        columns past… of `mask` with `past` columns cached, from a call of the base model stopped before its
        first layer runs, so the base model's own masking rules apply. Returns a function of a depth's cache
        that gives (args, kwargs) with that cache in place of the stand-in the mask was built against."""
        stand_in = DynamicCache()
        if past:
            empty = positions.new_zeros((1, 1, past, 1), dtype=self.states.dtype)
            stand_in.update(empty, empty, 0)
        captured: dict = {}

        def capture(_module, args, kwargs):
            captured["args"], captured["kwargs"] = args[1:], dict(kwargs)
            if not args:
                captured["kwargs"].pop("hidden_states")
            raise _LayerArguments

        handle = self.first_layer.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            self.inner(input_ids=torch.zeros_like(positions), attention_mask=mask, position_ids=positions,
                       use_cache=True, **{self.cache_arg: stand_in})
        except _LayerArguments:
            pass
        finally:
            handle.remove()

        def with_cache(cache: DynamicCache) -> tuple[tuple, dict]:
            def swap(value):
                return cache if value is stand_in else value

            return tuple(swap(v) for v in captured["args"]), {k: swap(v) for k, v in captured["kwargs"].items()}

        return with_cache


def _check_arguments(model: MTPModel, max_new_tokens: int, n_draft: int | None, temperature: float) -> int:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    n_draft = model.n_heads - 1 if n_draft is None else n_draft
    if not 0 <= n_draft <= model.n_heads - 1:
        raise ValueError(f"n_draft must be in 0…{model.n_heads - 1} (the model's draft heads), got {n_draft}")
    return n_draft


@torch.inference_mode()
def speculative_generate(model: MTPModel, input_ids: torch.Tensor, max_new_tokens: int,
                         eos_token_id: int | None = None, n_draft: int | None = None, *,
                         temperature: float = 0.0, generator: torch.Generator | None = None) -> SpeculativeResult:
    """Decode one sequence where heads 1…n_draft draft and head 0 verifies (see the module docstring).

    input_ids: [1, S] prompt (one row; `speculative_generate_batch` decodes several). Stops after
    `max_new_tokens` tokens or at `eos_token_id` (included in the tokens); None: no eos stop. n_draft: draft
    heads to use (default all, n_heads - 1; 0 is ordinary decoding through the same loop). temperature 0:
    greedy, the same tokens as greedy `generate`; > 0: sampled from the base model's distribution at that
    temperature (`generator` seeds it). Runs in eval and inference mode; every module's mode is restored.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise ValueError(f"speculative_generate decodes one sequence: input_ids must be [1, S] with S >= 1, got "
                         f"shape {tuple(input_ids.shape)} (batch size 1: speculative_generate_batch takes several)")
    return speculative_generate_batch(model, [input_ids[0].tolist()], max_new_tokens, eos_token_id, n_draft,
                                      temperature=temperature, generator=generator)[0]


@torch.inference_mode()
def speculative_generate_batch(model: MTPModel, prompts: list[list[int]], max_new_tokens: int,
                               eos_token_id: int | None = None, n_draft: int | None = None, *,
                               temperature: float = 0.0, generator: torch.Generator | None = None,
                               pad_token_id: int = 0) -> list[SpeculativeResult]:
    """`speculative_generate` for several prompts (token id lists, any lengths) at once: one result per row.

    Each row's tokens are those of decoding it alone (greedy: its greedy output; sampled: a draw from the same
    distribution). `forward_passes` of a row counts the forwards until it finished. `pad_token_id` fills the
    left padding (masked; any id in the vocabulary)."""
    n_draft = _check_arguments(model, max_new_tokens, n_draft, temperature)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    results = [SpeculativeResult([], 0, [0] * n_draft, [0] * n_draft) for _ in prompts]
    if max_new_tokens == 0:
        return results
    # Restored module by module: a wrapper's flag can differ from its base model's (from_base on an eval model).
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        _decode(model, prompts, max_new_tokens, eos_token_id, n_draft, temperature, generator, pad_token_id, results)
    finally:
        for module, training in modes.items():
            module.training = training
    return results


def _probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.float() / temperature, dim=-1)


def _choose(logits: torch.Tensor, temperature: float, generator: torch.Generator | None,
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Drafts from logits [..., V]: (tokens [...], None) greedy, or (tokens sampled at `temperature`, their
    distributions [..., V])."""
    if temperature == 0:
        return logits.argmax(-1), None
    probs = _probabilities(logits, temperature)
    if not probs.shape[:-1].numel():
        return probs.new_empty(probs.shape[:-1], dtype=torch.long), probs
    tokens = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
    return tokens.view(probs.shape[:-1]), probs


def _decode(model: MTPModel, prompts: list[list[int]], max_new_tokens: int, eos_token_id: int | None,
            n_draft: int, temperature: float, generator: torch.Generator | None, pad_token_id: int,
            results: list[SpeculativeResult]) -> None:
    device = model.unembedding.weight.device
    batch, width = len(prompts), max(len(p) for p in prompts)
    step_input = torch.tensor([[pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    # As `generate` numbers left-padded rows: 0… from each row's first real token (padding gets 1, masked).
    positions = (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)
    next_position = mask.sum(1)  # [B] each row's number of tokens, prompt included
    rows = torch.arange(batch, device=device)
    chain = model.mtp_config.head_type == "sequential" and n_draft > 0
    forward = _ChainForward(model, n_draft) if chain else _Forward(model, n_draft)
    if chain:
        forward.start(prompts, device)
    drafts = step_input.new_empty(batch, 0)  # the prefill forward is a step with no drafts
    draft_probs = None  # [B, k, V]: the distributions the drafts were sampled from (temperature > 0)
    active = [True] * batch
    while True:
        final = forward(step_input, mask, positions)
        k = drafts.shape[1]
        # Position `last` holds each row's newest accepted token; head 0 there predicts the token after it, which
        # drafts[:, 0] claims, and so on.
        last = step_input.shape[1] - 1 - k
        # One unembedding for head 0 at the k + 1 positions and the draft heads at the same positions (the next
        # drafts come from the position each row accepts up to, known only after head 0's logits). Decoding one
        # row is memory-bound: reading the [V, D] matrix once for (n_draft + 1)(k + 1) rows costs about what one
        # row does, where a second call would read it again (a fifth of what a 135M model reads per token).
        hidden = final[None, :, last:]
        if n_draft and not chain:
            hidden = torch.cat([hidden, forward.draft_hidden(last)])
        all_logits = model.unembedding(hidden)  # [1 + n_draft, B, k + 1, V]
        logits = all_logits[0]
        if temperature == 0:
            target = logits.argmax(-1)
            n_accepted = (target[:, :-1] == drafts).cumprod(1).sum(1)
            extra = target[rows, n_accepted]
        else:
            p = _probabilities(logits, temperature)
            n_accepted = torch.zeros(batch, dtype=torch.long, device=device)
            q = torch.zeros_like(p)  # no draft after the last position: the extra token there comes from p
            if k:
                q[:, :k] = draft_probs
                ratio = (p[:, :k].gather(2, drafts[..., None]) / q[:, :k].gather(2, drafts[..., None]))[..., 0]
                u = torch.rand(ratio.shape, generator=generator, device=device)
                n_accepted = (u < ratio).long().cumprod(1).sum(1)
            # After a rejection: max(0, p - q) renormalised; after all k accepted: p itself (q is 0 there).
            residual = (p[rows, n_accepted] - q[rows, n_accepted]).clamp(min=0)
            total = residual.sum(-1, keepdim=True)
            residual = torch.where(total > 0, residual / total.clamp(min=1e-30), p[rows, n_accepted])
            extra = torch.multinomial(residual, 1, generator=generator)[:, 0]
        if not chain:  # the next drafts come from each row's last accepted position
            next_drafts, next_probs = _choose(all_logits[1:, rows, n_accepted].transpose(0, 1), temperature,
                                              generator)  # [B, n_draft], [B, n_draft, V]
        accepted_list, extra_list, draft_list = n_accepted.tolist(), extra.tolist(), drafts.tolist()
        for b in range(batch):
            if not active[b]:
                continue
            result, a = results[b], accepted_list[b]
            result.forward_passes += 1
            for h in range(min(a + 1, k)):
                result.proposed[h] += 1
                result.accepted[h] += h < a
            emitted = draft_list[b][:a] + [extra_list[b]]
            if eos_token_id is not None and eos_token_id in emitted:
                emitted, active[b] = emitted[:emitted.index(eos_token_id) + 1], False
            result.tokens.extend(emitted[:max_new_tokens - len(result.tokens)])
            if len(result.tokens) >= max_new_tokens:
                active[b] = False
        if not any(active):
            return
        # Rejected drafts leave each row's attention mask; those every row rejected leave the caches.
        rejected = k - n_accepted  # [B]
        forward.drop_last(int(rejected.min()))
        mask = mask[:, :mask.shape[1] - int(rejected.min())]
        columns = torch.arange(mask.shape[1], device=device)
        mask = mask.masked_fill(columns >= mask.shape[1] - (rejected - rejected.min())[:, None], 0)
        if chain:
            # The accepted drafts and head 0's token join each row's tokens; the depths then draft from them.
            emitted_ids = torch.cat([drafts, drafts.new_zeros(batch, 1)], dim=1)
            emitted_ids[rows, n_accepted] = extra
            forward.record(next_position, emitted_ids)
        next_position = next_position + n_accepted + 1
        if chain:
            chained, chained_probs = forward.draft(mask, next_position - 1,
                                                   lambda logits: _choose(logits, temperature, generator))
            next_drafts = torch.stack(chained, dim=1)
            next_probs = None if temperature == 0 else torch.stack(chained_probs, dim=1)
        # Never draft past max_new_tokens: a step emits at most its drafts + 1 tokens.
        remaining = max(max_new_tokens - len(r.tokens) for r, a in zip(results, active, strict=True) if a)
        drafts = next_drafts[:, :max(0, min(n_draft, remaining - 1))]
        draft_probs = next_probs[:, :drafts.shape[1]] if next_probs is not None else None
        step_input = torch.cat([extra[:, None], drafts], dim=1)
        positions = next_position[:, None] - 1 + torch.arange(step_input.shape[1], device=device)
        mask = torch.cat([mask, mask.new_ones(batch, step_input.shape[1])], dim=1)
