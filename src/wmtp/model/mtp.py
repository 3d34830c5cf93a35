"""The multi-token prediction model: a Hugging Face causal LM as trunk, n output heads, one unembedding.

Head h at position t predicts x[t+1+h] (docs/method.md §1–§2). Head 0 is always the base model itself, so
decoding with head 0 (`generate`) is ordinary decoding of the wrapped model, KV cache included.

Head types:
- `transformer` (Meta-style, Gloeckle et al. 2024): the trunk is every decoder layer but the last, head 0
  is the last layer, heads 1…n-1 are extra decoder layers initialised as copies of it. They see the same
  trunk state, attention mask and rotary position embeddings as the last layer (captured from the base
  model's own call, so the base model's masking rules apply unchanged), then the shared final norm and
  the shared unembedding.
- `sequential` (DeepSeek-V3-style MTP modules, docs/method.md §2.1): depth k = 1…n-1 combines the previous
  depth's hidden state with the embedding of the token k ahead, h'_k = Block_k(W_k [RMSNorm(emb(x[t+k])) ;
  RMSNorm(h_{k-1,t})]) (embedding half first, as vLLM, SGLang and transformers' `MtpLayer`; depth 1 reads the
  trunk's output after its final norm, as transformers and vLLM), then the depth's own final norm and the shared
  unembedding. Each depth is one `SequentialDepth` module (one unit for activation checkpointing and FSDP2).
- `linear` (Medusa-style): f_h(z) = z + W2·SiLU(W1·z) on the base model's final (normed) hidden state,
  with W2 zero-initialised so each head starts as the identity on the shared unembedding. Works on any
  causal LM; head 0 is the base model's own head.

On disk (`save_pretrained`): the base model exactly as Hugging Face writes it (`config.json` plus
`model.safetensors`, loadable by any HF tool as a plain causal LM), the extra heads in
`mtp_heads.safetensors`, the MTP settings under the `wmtp` key of `config.json`, and the tokenizer.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from ..config import ConfigError
from ..loss import (
    IGNORE_INDEX,
    check_weights,
    fused_linear_grad_norm_sq,
    fused_linear_mtp_ce,
    loss_denominator,
    pair_coefficients,
    safe_divide,
)
from ..runtime.atomic import atomic_directory
from . import native

HEAD_TYPES = ("transformer", "linear", "sequential")
HEADS_FILE = "mtp_heads.safetensors"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
CONFIG_KEY = "wmtp"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class MTPConfig:
    """The MTP shape. n_heads counts head 0 (the base model's own next-token head)."""

    n_heads: int = 4
    head_type: str = "transformer"
    native: str | None = None  # a family of native.LAYOUTS: the depths came from, and go back to, its own layout

    def __post_init__(self) -> None:
        if self.native is not None and (self.native not in native.LAYOUTS or self.head_type != "sequential"):
            raise ValueError(f"native must be one of {sorted(native.LAYOUTS)} with sequential heads, got "
                             f"{self.native!r} with {self.head_type}")
        if self.n_heads < 1:
            raise ValueError(f"n_heads must be >= 1, got {self.n_heads}")
        if self.head_type not in HEAD_TYPES:
            raise ValueError(f"head_type must be one of {HEAD_TYPES}, got {self.head_type!r}")


WeightsFn = Callable[[list[torch.Tensor], "MTPModel"], torch.Tensor]


@dataclass(frozen=True)
class MTPLoss:
    """What a forward needs to take the weighted MTP loss (docs/method.md §3), with the meaning of
    `weighted_mtp_loss`.

    labels: [B, S, n] from `mtp_labels`. weights: [B, S, n] detached (None: 1 on every valid pair); or
    weights_fn (instead of weights): makes them from the forward's own detached head hidden states (each [B, S, D])
    and the model, under no_grad, before the loss is taken on the same hidden states (a scheme's one-forward mode).
    head_coef: λ_h per head (None: all 1). reduction: token_mean or weight_mean. normalizer: the loss's denominator
    (None: this micro-batch's own; a step summed over micro-batches passes the step's). allow_negative: weights may be
    negative (token_mean only). chunk_size: valid pairs per CE chunk (peak memory ~ chunk × V)."""

    labels: torch.Tensor
    weights: torch.Tensor | None = None
    weights_fn: WeightsFn | None = None
    head_coef: Sequence[float] | torch.Tensor | None = None
    reduction: str = "token_mean"
    normalizer: torch.Tensor | float | None = None
    allow_negative: bool = False
    chunk_size: int = 256

    def __post_init__(self) -> None:
        if self.weights is not None and self.weights_fn is not None:
            raise ValueError("pass weights or weights_fn, not both")


@dataclass(frozen=True)
class GradNormScores:
    """Instead of a loss, each pair's ‖∂ℓ/∂logits‖² [B, S, n], chunked and without gradient: the scoring pass of
    gradient-norm weighting, which goes through the forward so that DDP and FSDP2 gather the parameters as usual.
    labels: [B, S, n]; chunk_size: valid pairs per chunk."""

    labels: torch.Tensor
    chunk_size: int = 256


@dataclass
class MTPOutput:
    """What a forward returns. Shapes: ce, correct, grad_norm_sq [B, S, n]; logits [B, S, n, V];
    trunk_hidden [B, S, D]."""

    loss: torch.Tensor | None = None
    ce: torch.Tensor | None = None
    correct: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    trunk_hidden: torch.Tensor | None = None
    grad_norm_sq: torch.Tensor | None = None
    weights: torch.Tensor | None = None  # the weights `MTPLoss.weights_fn` made from this forward's hidden states


@dataclass(frozen=True)
class TrunkStates:
    """The frozen trunk's states of a batch, read from a cache (`model.trunk_cache`) instead of running the trunk
    when only the extra heads train (`mtp.trainable: heads`). final: [B, S, D] the trunk's output after its final
    norm (head 0's state; linear heads' and sequential depth 1's input); z: [B, S, D] the last decoder layer's input
    (transformer heads only, else None)."""

    final: torch.Tensor
    z: torch.Tensor | None = None


class _LastLayerArguments(Exception):
    """Raised by `_ArgumentRecorder` with what the last decoder layer would have been called with."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        super().__init__("recorded")
        self.args, self.kwargs = args, kwargs


class _ArgumentRecorder(nn.Module):
    """Stands in for the decoder layers during `MTPModel.last_layer_arguments`: the inner model runs its own preamble
    (embedding, masks, rotary embeddings) and calls this instead of its first layer, which records the call and
    stops the forward. It carries the layer's `attention_type` and `layer_type`, so that a model with per-layer masks
    (sliding windows, Qwen3-Next's linear-attention layers) hands it that layer's."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.attention_type = getattr(layer, "attention_type", None)
        self.layer_type = getattr(layer, "layer_type", None)

    def forward(self, *args, **kwargs):
        raise _LastLayerArguments(args, kwargs)


class ResidualHead(nn.Module):
    """Medusa-style head: z + W2·SiLU(W1·z), W2 zero-initialised (the head starts as the identity)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.up = nn.Linear(hidden_size, hidden_size)
        self.down = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.down(nn.functional.silu(self.up(z)))


def _reset_norm(norm: nn.Module, scale: float = 1.0) -> nn.Module:
    """A norm set to `scale` times its normalised input (bias 0): weight `scale`, or `scale` − 1 for a zero-centred
    norm, which applies its weight as 1 + w (Qwen3-Next's and Qwen3.5's), found by probing the norm with weight 0. On
    the meta device (FSDP2's skeleton, whose values are loaded afterwards) the weight is set without probing."""
    with torch.no_grad():
        weight = norm.weight
        offset = 0.0
        if weight.device.type != "meta":
            saved = weight.detach().clone()
            weight.zero_()
            probe = norm(torch.ones(1, weight.shape[-1], dtype=weight.dtype, device=weight.device))
            offset = 1.0 if bool(probe.abs().max() > 0.5) else 0.0
            weight.copy_(saved)
        weight.fill_(scale - offset)
        if getattr(norm, "bias", None) is not None:
            norm.bias.zero_()
    return norm


class SequentialDepth(nn.Module):
    """One DeepSeek-V3-style MTP module (docs/method.md §2.1): h'_k = block(eh_proj([enorm(e) ; hnorm(h_{k-1})])),
    returned with its own final norm applied, norm(h'_k), which goes to the shared unembedding.

    The weights are named as DeepSeek-V3's checkpoints and transformers' `MtpLayer` name them (enorm, hnorm, eh_proj,
    the decoder layer as mtp_block); `norm` is DeepSeek's `shared_head.norm` (transformers' `post_norm`). Initialised
    from the trunk: the block a copy of its last decoder layer, `norm` a copy of its final norm, enorm and hnorm at
    weight 1, and eh_proj = [0 | I], so that a fresh depth starts as a transformer head on the trunk's normed output
    and learns how much of the next token's embedding to mix in.

    Two families of released checkpoints differ (native.LAYOUTS): `embed_first=False` concatenates [hnorm(h) ;
    enorm(e)] (MiMo), `chain_normed=True` hands the next depth norm(h'_k) instead of h'_k (Qwen3-Next, MiMo)."""

    def __init__(self, block: nn.Module, final_norm: nn.Module, hidden_size: int, *, embed_first: bool = True,
                 chain_normed: bool = False) -> None:
        super().__init__()
        self.embed_first, self.chain_normed = embed_first, chain_normed
        self.enorm = _reset_norm(copy.deepcopy(final_norm))
        self.hnorm = _reset_norm(copy.deepcopy(final_norm))
        ref = next(block.parameters())
        self.eh_proj = nn.Linear(2 * hidden_size, hidden_size, bias=False, device=ref.device, dtype=ref.dtype)
        hidden_half = slice(hidden_size, None) if embed_first else slice(None, hidden_size)
        if ref.device.type != "meta":
            with torch.no_grad():
                self.eh_proj.weight.zero_()
                self.eh_proj.weight[:, hidden_half].copy_(torch.eye(hidden_size, device=ref.device, dtype=ref.dtype))
        self.mtp_block = block
        self.norm = copy.deepcopy(final_norm)

    def forward(self, hidden_states: torch.Tensor, inputs_embeds: torch.Tensor, *args,
                **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden_states: the previous depth's state h_{k-1} [B, S, D]; inputs_embeds: emb(x[t+k]) [B, S, D]; the
        rest: the decoder layer's own arguments (mask, rotary embeddings), as the trunk's last layer got them.
        Returns (the state the next depth reads: h'_k, or norm(h'_k) when chain_normed; norm(h'_k), which the
        unembedding reads)."""
        e, h = self.enorm(inputs_embeds), self.hnorm(hidden_states)
        x = self.eh_proj(torch.cat([e, h] if self.embed_first else [h, e], dim=-1))
        h = self.mtp_block(x, *args, **kwargs)
        h = h[0] if isinstance(h, tuple) else h
        normed = self.norm(h)
        return (normed if self.chain_normed else h), normed


def shifted_inputs(input_ids: torch.Tensor, k: int, attention_mask: torch.Tensor | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Depth k's input tokens, x at t+k, shape [B, S], and where they exist, bool [B, S] (t+k < S and not padding);
    elsewhere the token is 0 and its embedding is zeroed. Every pair that needs a missing input is also an ignored
    label (`mtp_labels`: x[t+k+1] past the end, padding or in another document), and causal attention keeps the
    missing ones from reaching a valid position (docs/method.md §2.1)."""
    batch, seq = input_ids.shape
    ids = torch.zeros_like(input_ids)
    present = torch.zeros((batch, seq), dtype=torch.bool, device=input_ids.device)
    if k < seq:
        ids[:, : seq - k] = input_ids[:, k:]
        present[:, : seq - k] = True if attention_mask is None else attention_mask[:, k:].bool()
    return ids, present


def decoder_parts(base: PreTrainedModel) -> tuple[nn.Module, nn.ModuleList, nn.Module]:
    """(inner model, its decoder layers, its final norm) for Llama-family and GPT-2-style models."""
    inner = base.base_model
    layers = next((getattr(inner, name) for name in ("layers", "h") if isinstance(getattr(inner, name, None),
                                                                          nn.ModuleList)), None)
    norm = next((getattr(inner, name) for name in ("norm", "ln_f") if getattr(inner, name, None) is not None),
                None)
    if layers is None or norm is None:
        raise ValueError(f"transformer heads need a decoder with `layers` (or `h`) and a final `norm` (or `ln_f`); "
                         f"{type(base).__name__} has neither: use head_type='linear'")
    return inner, layers, norm


def check_plain_unembedding(config) -> None:
    # The fast path computes logits as hidden @ U.T (+ bias); a model that rescales or caps its logits
    # would silently train on different logits.
    for key in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        value = getattr(config, key, None)
        if value not in (None, 1, 1.0):
            raise ValueError(f"{config.model_type}: `{key}={value}` transforms the logits; the MTP fast path "
                             "supports plain unembeddings only")


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A whole tensor on the CPU: a sharded DTensor is gathered from every rank (a collective)."""
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu().contiguous()


def _export_tensors(model: MTPModel) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The base model's tensors under Hugging Face's names, a tied weight once (under its first name, as Hugging Face
    saves it), and the extra heads' tensors; possibly sharded, not yet gathered."""
    base, seen = {}, set()
    for name, tensor in model.base.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            base[name] = tensor
    return base, dict(model.heads.state_dict(keep_vars=True))


def _shard_plan(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Names per shard, in order, each shard at most `max_bytes` (a bigger tensor gets a shard of its own); sizes
    come from the full shapes, so nothing is gathered to plan."""
    plan: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if plan[-1] and size + nbytes > max_bytes:
            plan.append([])
            size = 0
        plan[-1].append(name)
        size += nbytes
    return plan


def read_tensors(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a missing, truncated or damaged file is an error naming it."""
    try:
        return load_file(path, device=device)
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"{path}: cannot read the tensors ({str(exc).splitlines()[0]}); the file is damaged or "
                         "incomplete") from None


def load_causal_lm(spec: str | os.PathLike, *, dtype: torch.dtype | None = None,
                   token: str | None = None) -> PreTrainedModel:
    """A causal LM from a hub id, a local directory, or a GGUF file (dequantised by transformers);
    `token` for gated hub models."""
    path = Path(spec)
    kwargs = {} if dtype is None else {"dtype": dtype}
    if token is not None:
        kwargs["token"] = token
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
    if path.exists() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json, not a Hugging Face model directory")
    return AutoModelForCausalLM.from_pretrained(str(spec), **kwargs)


def is_wmtp_model_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory written by `MTPModel.save_pretrained` (its config.json has the `wmtp` key)."""
    config_path = Path(path) / "config.json"
    try:
        return config_path.is_file() and json.loads(config_path.read_text()).get(CONFIG_KEY) is not None
    except (OSError, ValueError):
        return False


class MTPModel(nn.Module):
    """A causal LM with n output heads sharing the final norm and the unembedding (docs/method.md §2)."""

    def __init__(self, base: PreTrainedModel, heads: nn.ModuleList, config: MTPConfig) -> None:
        super().__init__()
        if len(heads) != config.n_heads - 1:
            raise ValueError(f"{config.n_heads} heads need {config.n_heads - 1} extra head modules, got {len(heads)}")
        check_plain_unembedding(base.config)
        self.base = base
        self.heads = heads
        self.mtp_config = config
        self.fresh_depths = False  # sequential depths built from the trunk, not loaded (`scale_fresh_depths`)

    # construction -----------------------------------------------------------------------------------------
    def set_trainable(self, trainable: str) -> MTPModel:
        """`all`: every parameter trains; `heads`: only the extra heads 1…n-1 (the base model is frozen, so head 0
        stays the base model bit for bit and no gradient flows through the trunk)."""
        if trainable not in ("all", "heads"):
            raise ValueError(f"trainable must be all or heads, got {trainable!r}")
        self.base.requires_grad_(trainable == "all")
        self.heads.requires_grad_(True)
        return self

    @classmethod
    def from_base(cls, model_or_path: PreTrainedModel | str | os.PathLike, n_heads: int = 4,
                  head_type: str = "transformer", *, dtype: torch.dtype | None = None) -> MTPModel:
        """Wrap a causal LM; head 0 stays the base model bit for bit, extra heads are initialised as
        copies of the last decoder layer (transformer) or as the identity (linear)."""
        config = MTPConfig(n_heads=n_heads, head_type=head_type)
        base = model_or_path if isinstance(model_or_path, PreTrainedModel) else load_causal_lm(model_or_path,
                                                                                             dtype=dtype)
        model = cls(base, cls._new_heads(base, config), config)
        model.fresh_depths = head_type == "sequential" and n_heads > 1
        return model

    @staticmethod
    def _new_heads(base: PreTrainedModel, config: MTPConfig) -> nn.ModuleList:
        if config.head_type == "transformer":
            _, layers, _ = decoder_parts(base)
            return nn.ModuleList(copy.deepcopy(layers[-1]) for _ in range(config.n_heads - 1))
        if config.head_type == "sequential":
            _, layers, norm = decoder_parts(base)
            hidden = base.get_output_embeddings().weight.shape[1]
            return nn.ModuleList(SequentialDepth(copy.deepcopy(layers[-1]), norm, hidden)
                                 for _ in range(config.n_heads - 1))
        hidden = base.get_output_embeddings().weight.shape[1]
        ref = base.get_output_embeddings().weight
        return nn.ModuleList(ResidualHead(hidden).to(device=ref.device, dtype=ref.dtype)
                             for _ in range(config.n_heads - 1))

    @property
    def n_heads(self) -> int:
        return self.mtp_config.n_heads

    @property
    def config(self):
        """The base model's Hugging Face config."""
        return self.base.config

    @property
    def unembedding(self) -> nn.Linear:
        return self.base.get_output_embeddings()

    # forward ----------------------------------------------------------------------------------------------
    def head_hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                           position_ids: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Each head's final hidden state (after the shared final norm) [B, S, D], and the trunk state z
        [B, S, D] (the input of the last decoder layer for transformer heads, the base model's final hidden
        state for linear and sequential heads). Sequential depth k reads depth k-1's state (depth 0: the base model's
        final hidden state) and the embedding of x[t+k] (`shifted_inputs`), docs/method.md §2.1."""
        if self.mtp_config.head_type == "linear":
            out = self.base.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                       position_ids=position_ids, use_cache=False)
            z = out.last_hidden_state
            return [z] + [head(z) for head in self.heads], z

        inner, layers, _ = decoder_parts(self.base)
        captured: dict = {}

        def capture(_module, args, kwargs):
            captured["args"], captured["kwargs"] = args, kwargs

        handle = self._argument_source(layers).register_forward_pre_hook(capture, with_kwargs=True)
        try:
            out = inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=False)
        finally:
            handle.remove()
        args, kwargs = captured["args"], dict(captured["kwargs"])
        if args:
            z, rest = args[0], args[1:]
        else:
            z, rest = kwargs.pop("hidden_states"), ()
        return self._extra_heads(out.last_hidden_state, z, input_ids, attention_mask, rest, kwargs)

    def _argument_source(self, layers: nn.ModuleList) -> nn.Module:
        """The trunk layer whose arguments (mask, rotary embeddings) the heads get: the last one; for a native
        checkpoint's depths, whose blocks are full-attention layers, the trunk's last full-attention layer."""
        return layers[-1] if self.mtp_config.native is None else layers[native.capture_index(self.base.config)]

    def _extra_heads(self, final: torch.Tensor, z: torch.Tensor | None, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor | None, rest: tuple, kwargs: dict,
                     ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every head's normed state from the trunk's: `final` its normed output, `z` its last layer's input
        (transformer heads), `rest`/`kwargs` the layer arguments of `_argument_source`. Returns (hidden states, trunk
        state). One code path for a trunk forward (`head_hidden_states`) and a trunk cache (`heads_from_trunk`)."""
        hidden = [final]
        if self.mtp_config.head_type == "sequential":
            embed = self.base.get_input_embeddings()
            state = final
            for k, depth in enumerate(self.heads, start=1):
                ids, present = shifted_inputs(input_ids, k, attention_mask)
                embeds = embed(ids) * present.unsqueeze(-1).to(state.dtype)
                state, normed = depth(state, embeds, *rest, **kwargs)
                hidden.append(normed)
            return hidden, final
        if z is None:
            raise ValueError("transformer heads read the last decoder layer's input: TrunkStates.z is missing")
        norm = decoder_parts(self.base)[2]
        for head in self.heads:
            h = head(z, *rest, **kwargs)
            hidden.append(norm(h[0] if isinstance(h, tuple) else h))
        return hidden, z

    def trunk_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     position_ids: torch.Tensor | None = None) -> TrunkStates:
        """What the heads read from the trunk (`TrunkStates`), from one forward of the trunk without the heads."""
        if self.mtp_config.head_type != "transformer":
            out = self.base.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                       position_ids=position_ids, use_cache=False)
            return TrunkStates(final=out.last_hidden_state)
        inner, layers, _ = decoder_parts(self.base)
        captured: dict = {}

        def capture(_module, args, kwargs):
            captured["z"] = args[0] if args else kwargs["hidden_states"]

        handle = layers[-1].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            out = inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=False)
        finally:
            handle.remove()
        return TrunkStates(final=out.last_hidden_state, z=captured["z"])

    def last_layer_arguments(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                             position_ids: torch.Tensor | None = None) -> tuple[tuple, dict]:
        """The arguments the last decoder layer gets besides its input state (mask, rotary embeddings, position
        ids), made by the inner model's own code from the batch without running any layer: they depend on the
        token positions and the attention mask only, so a cache of trunk states need not store them."""
        inner, layers, _ = decoder_parts(self.base)
        name = next(n for n in ("layers", "h") if getattr(inner, n, None) is layers)
        setattr(inner, name, nn.ModuleList([_ArgumentRecorder(self._argument_source(layers))]))
        try:
            inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        except _LastLayerArguments as recorded:
            args, kwargs = recorded.args[1:], dict(recorded.kwargs)
            kwargs.pop("hidden_states", None)
            return args, kwargs
        finally:
            setattr(inner, name, layers)
        raise RuntimeError(f"{type(inner).__name__} did not call its decoder layers")

    def heads_from_trunk(self, trunk: TrunkStates, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor | None = None,
                         position_ids: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """`head_hidden_states` from the trunk's cached states instead of a trunk forward (the base model frozen)."""
        if self.mtp_config.head_type == "linear":
            return [trunk.final] + [head(trunk.final) for head in self.heads], trunk.final
        rest, kwargs = self.last_layer_arguments(input_ids, attention_mask, position_ids)
        return self._extra_heads(trunk.final, trunk.z, input_ids, attention_mask, rest, kwargs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                objective: MTPLoss | GradNormScores | None = None, *, position_ids: torch.Tensor | None = None,
                return_logits: bool = False, trunk: TrunkStates | None = None) -> MTPOutput:
        """input_ids, attention_mask, position_ids: [B, S]. Always returns the trunk state [B, S, D]. `trunk`: the
        trunk's states read from a cache, used instead of running the trunk (`heads_from_trunk`).

        `objective` says what the forward computes from the labels: an `MTPLoss` gives the weighted loss on the fast
        path (no [B, S, n, V] tensor) with each pair's CE and top-1 correctness [B, S, n]; `GradNormScores` gives
        each pair's ‖∂ℓ/∂logits‖² instead; None: no loss. `return_logits` also returns all heads' logits
        [B, S, n, V]: for small inputs and for the reference path only."""
        hidden, z = (self.head_hidden_states(input_ids, attention_mask, position_ids) if trunk is None else
                     self.heads_from_trunk(trunk, input_ids, attention_mask, position_ids))
        output = MTPOutput(trunk_hidden=z)
        if return_logits:
            output.logits = torch.stack([self.unembedding(h) for h in hidden], dim=2)
        if objective is None:
            return output
        labels = objective.labels
        if labels.shape != (*input_ids.shape, self.n_heads):
            raise ValueError(f"labels must be [B, S, n]={(*input_ids.shape, self.n_heads)}, got {tuple(labels.shape)}")
        if isinstance(objective, GradNormScores):
            output.grad_norm_sq = fused_linear_grad_norm_sq(hidden, self.unembedding.weight, labels,
                                                            bias=self.unembedding.bias, chunk_size=objective.chunk_size)
            return output
        weights = objective.weights
        if objective.weights_fn is not None:
            with torch.no_grad():
                weights = objective.weights_fn([h.detach() for h in hidden], self).detach()
            output.weights = weights
        check_weights(weights, labels, objective.reduction, objective.allow_negative)
        normalizer = objective.normalizer
        if normalizer is None:
            normalizer = loss_denominator(labels, weights, head_coef=objective.head_coef,
                                          reduction=objective.reduction)
        coef = safe_divide(pair_coefficients(labels, weights, head_coef=objective.head_coef), normalizer)
        output.loss, output.ce, output.correct = fused_linear_mtp_ce(
            hidden, self.unembedding.weight, labels, coef, bias=self.unembedding.bias,
            chunk_size=objective.chunk_size, ignore_index=IGNORE_INDEX)
        return output

    def generate(self, *args, **kwargs):
        """Ordinary Hugging Face decoding with head 0 (the base model), KV cache included."""
        return self.base.generate(*args, **kwargs)

    # persistence ------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, tokenizer=None, *, max_shard_size: int = 5 * 2**30,
                        write: bool = True) -> Path | None:
        """Write the model (and tokenizer) to `directory` atomically: into a sibling temp dir, then renamed.

        The base model is written as Hugging Face writes it (config.json; safetensors shards of at most
        `max_shard_size` bytes with `model.safetensors.index.json` when there are several; a tied output embedding
        left out), the extra heads as `mtp_heads.safetensors`. Tensors are gathered one at a time, so a sharded
        (FSDP2) model is never whole on one rank: every rank must call this (the gathers are collectives) and the
        ranks with `write=False` only take part in them. Peak memory of the writer: one shard plus one tensor.
        """
        target = Path(directory)
        base, heads = _export_tensors(self)
        layout = native.LAYOUTS[self.mtp_config.native] if self.mtp_config.native is not None else None
        if layout is not None:  # the depths go into the model's own files, under the checkpoint's names
            base.update(self._native_tensors(layout, heads))
            heads = {}
        plan = _shard_plan(base, max_shard_size)
        if not write:
            for names in plan:
                for name in names:
                    _full(base[name])
            for tensor in heads.values():
                _full(tensor)
            return None
        with atomic_directory(target) as tmp:
            files = [WEIGHTS_FILE] if len(plan) == 1 else [
                f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
            weight_map, total = {}, 0
            for file, names in zip(files, plan, strict=True):
                shard = {name: _full(base[name]) for name in names}
                if layout is not None:  # routed experts per expert, as the family's files keep them
                    shard = {key: t for name, tensor in shard.items()
                             for key, t in native.to_disk(name, tensor).items()}
                    names = list(shard)
                total += sum(t.numel() * t.element_size() for t in shard.values())
                save_file(shard, tmp / file, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(names, file))
                del shard
            if len(plan) > 1:
                index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
                (tmp / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
            if layout is None:
                save_file({name: _full(t) for name, t in heads.items()}, tmp / HEADS_FILE,
                          metadata={"format": "pt", CONFIG_KEY: json.dumps(self._settings())})
            self.base.config.save_pretrained(tmp)
            if getattr(self.base, "generation_config", None) is not None and self.base.can_generate():
                self.base.generation_config.save_pretrained(tmp)
            config_path = tmp / "config.json"
            config = json.loads(config_path.read_text())
            config[CONFIG_KEY] = {**self._settings(), "format_version": FORMAT_VERSION}
            if layout is not None:
                config = native.config_for_disk(layout, config, self.n_heads - 1)
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        return target

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, dtype: torch.dtype | None = None) -> MTPModel:
        """Load a directory written by `save_pretrained`."""
        directory = Path(directory)
        config_path = directory / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{directory}: no config.json, not a saved wmtp model")
        settings = json.loads(config_path.read_text()).get(CONFIG_KEY)
        if settings is None:
            raise ValueError(f"{config_path}: no `{CONFIG_KEY}` key; this is a plain causal LM, "
                             "use MTPModel.from_base to add heads")
        if settings.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{config_path}: wmtp format_version {settings.get('format_version')} is not "
                             f"supported (expected {FORMAT_VERSION})")
        if settings.get("native") is not None:
            return cls.from_native(directory, n_heads=settings["n_heads"], dtype=dtype)
        config = MTPConfig(n_heads=settings["n_heads"], head_type=settings["head_type"])
        try:
            base = load_causal_lm(directory, dtype=dtype)
        except (SafetensorError, OSError) as exc:  # a truncated or damaged weight file
            raise ConfigError(f"{directory}: cannot read the model's weights ({str(exc).splitlines()[0]}); the "
                             "files are damaged or incomplete") from None
        if hasattr(base.config, CONFIG_KEY):  # the heads' settings belong to this object, not to the base model,
            delattr(base.config, CONFIG_KEY)  # whose own save_pretrained must write a plain causal LM
        heads = cls._new_heads(base, config)
        if config.n_heads > 1:
            heads.load_state_dict(read_tensors(directory / HEADS_FILE, device=str(base.device)), strict=True)
        return cls(base, heads, config)

    def _settings(self) -> dict:
        """The MTP settings as config.json's `wmtp` key keeps them (`native` only for a native layout)."""
        return {key: value for key, value in asdict(self.mtp_config).items() if key != "native" or value is not None}

    def _native_tensors(self, layout: native.NativeLayout, heads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The depths' tensors under the checkpoint's names, with each depth's copies of the trunk's embedding and
        output head where the family keeps them (not yet gathered; routed experts still fused)."""
        num_layers = self.base.config.num_hidden_layers
        out = {}
        for k in range(self.n_heads - 1):
            own = {key.partition(".")[2]: tensor for key, tensor in heads.items() if key.partition(".")[0] == str(k)}
            out.update({disk: own[key] for key, disk in native.depth_names(layout, list(own), k, num_layers).items()})
            out.update(native.copies_to_disk(layout, self.base, k, num_layers))
        return out

    @classmethod
    def from_native(cls, directory: str | os.PathLike, *, n_heads: int | None = None, dtype: torch.dtype | None = None,
                    token: str | None = None) -> MTPModel:
        """A checkpoint that ships its own MTP layers (`native.LAYOUTS`): the base model as transformers loads it (it
        drops those tensors), the depths built from them, each the family's own decoder layer. Strict: every MTP
        tensor of the files is used, none is missing, every shape matches. `n_heads` (the recipe's) must be the
        file's depths + 1: a prefix is not loaded, since writing back must return every depth the checkpoint had."""
        directory = Path(directory)
        found = native.detect(directory)
        if found is None:
            raise ConfigError(f"{directory}: no MTP layers of a known family (native.LAYOUTS) in this checkpoint")
        layout, depths = found
        where = f"{directory / 'config.json'}: {layout.count_key}"
        if layout.max_depths is not None and depths > layout.max_depths:
            raise ConfigError(f"{where} is {depths}; {layout.family} keeps one fc and one set of norms for its MTP "
                              f"layers, wmtp reads at most {layout.max_depths}")
        if n_heads is not None and n_heads - 1 != depths:
            raise ConfigError(f"{where}: the checkpoint has {depths} MTP depth(s), the recipe asks for n_heads "
                              f"{n_heads} ({n_heads - 1} depth(s)); set mtp.n_heads: {depths + 1}")
        try:
            base = (load_causal_lm(directory, dtype=dtype, token=token) if layout.trunk is None
                    else native.load_trunk(directory, layout, dtype))
        except (SafetensorError, OSError) as exc:
            raise ConfigError(f"{directory}: cannot read the model's weights ({str(exc).splitlines()[0]}); the "
                             "files are damaged or incomplete") from None
        if hasattr(base.config, CONFIG_KEY):
            delattr(base.config, CONFIG_KEY)
        _, layers, norm = decoder_parts(base)
        num_layers, ref = base.config.num_hidden_layers, base.get_output_embeddings().weight
        tensors = native.read_mtp_tensors(directory, layout, num_layers)
        used: set[str] = set()
        heads = nn.ModuleList()
        for k in range(depths):
            depth = SequentialDepth(native.new_block(layout, base, layers, k), norm, ref.shape[1],
                                    embed_first=layout.embed_first, chain_normed=layout.chain_normed)
            native.load_depth(layout, depth, k, num_layers, tensors, used, directory, ref.dtype, ref.device)
            native.check_copies(layout, base, k, num_layers, tensors, used, directory)
            heads.append(depth)
        unused = sorted(set(tensors) - used)
        if unused:
            raise ConfigError(f"{directory / tensors[unused[0]][1]}: `{unused[0]}` is not a tensor of the {depths} "
                              f"{layout.family} MTP depth(s) {layout.count_key} declares ({len(unused)} such)")
        return cls(base, heads, MTPConfig(n_heads=depths + 1, head_type="sequential", native=layout.family))

@torch.no_grad()
def scale_fresh_depths(model: MTPModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> float | None:
    """Set the input norm `hnorm` of every fresh sequential depth to R, the median over the valid positions of
    `input_ids` [B, S] of the RMS of the trunk's residual stream where its final norm reads it; returns R (None: the
    model has no fresh depths, nothing changes).

    Depth 1 reads h_0 after the trunk's final norm (docs/method.md §2.1), a state of RMS about 1, while the copied
    block was trained on a residual stream of RMS R (35 for SmolLM2-135M): at weight 1 the block's own update
    swamps its input and a fresh depth starts far from any prediction (CE 68 and 95 nats at depths 1 and 3 of
    SmolLM2, against 12.3 and 13.4 at weight R), and a norm's weight moves by about the learning rate per step. The
    median leaves out the attention sinks (position 0: RMS 212 there)."""
    if not model.fresh_depths:
        return None
    inner, _, norm = decoder_parts(model.base)
    captured: list[torch.Tensor] = []
    handle = norm.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
    try:
        inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        handle.remove()
    rms = captured[-1].float().pow(2).mean(-1).sqrt()[attention_mask.bool()]
    scale = float(rms.median())
    for depth in model.heads:
        _reset_norm(depth.hnorm, scale)
    return scale
