"""A memory plan before launch: what one rank holds at its peak, for the configured model, world size, precision,
sharding, activation checkpointing and loss chunking, and whether it fits a device (`wmtp plan`, `--dry-run`).

The model is built on the meta device (shapes, no weights), so a 7B plan costs a fraction of a second. Per rank:
- parameters, gradients (same dtype) and AdamW's two moments: whole with DDP (which also keeps a bucket copy
  of the gradients), 1/world with FSDP2, on the host with FSDP2's CPU offload;
- FSDP2's unsharded copies: the root's parameters and gradients (embeddings, norm, unembedding) for the whole
  step, two blocks' parameters (the one computing and the one prefetched) in the gather dtype, and one block's
  gradients before their reduce-scatter, in the reduce dtype;
- activations of one micro-batch: the bytes autograd saves for one block, counted by running the block on the
  meta device with its attention replaced by flash attention's saving rule (q, k, v, output, log-sum-exp),
  times the blocks; a checkpointed block keeps only its input, and in the backward one block is recomputed at a
  time (its activations and their gradients alive together). Under
  autocast with fp32 weights each block also keeps a half-precision copy of its weights until the backward;
- the loss: the heads' stacked hidden states, the fused CE's saved gradients (pairs × D in the compute dtype,
  V × D in fp32) and its per-chunk fp32 logits (two chunk × V buffers);
- Rho-1's online reference model (replicated, frozen) and its chunked logits.
Allocator caching and fragmentation, the CUDA context and communication buffers are not modelled (leave
10-20% headroom); `benchmarks/scale.py` sets the estimate beside measured peaks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


@dataclass(frozen=True)
class PlanInputs:
    """What the plan depends on (set-up fills it from the config and recipe)."""

    world_size: int
    strategy: str  # ddp or fsdp2
    param_dtype: torch.dtype  # the weights' own dtype (config model.dtype)
    gather_dtype: torch.dtype | None  # FSDP2 mixed precision param_dtype
    reduce_dtype: torch.dtype | None  # FSDP2 mixed precision reduce_dtype (default: the gather dtype)
    autocast_dtype: torch.dtype | None  # compute.precision bf16/fp16
    cpu_offload: bool
    checkpoint_every: int | None
    micro_batch_size: int
    seq_len: int
    chunk_size: int
    reference_params: int = 0  # Rho-1's online reference
    reference_dtype: torch.dtype = torch.float32


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per rank; `device` on the accelerator, `host` in CPU memory (offloaded state)."""

    parameters: int
    gradients: int
    optimizer: int
    gathered: int
    activations: int
    activations_without_checkpointing: int
    loss: int
    reference: int
    host: int
    params_total: int
    blocks: int

    @property
    def device(self) -> int:
        return (self.parameters + self.gradients + self.optimizer + self.gathered + self.activations + self.loss
                + self.reference)

    def table(self, device_memory: int | None = None) -> str:
        checkpointed = self.activations != self.activations_without_checkpointing
        rows = [("parameters", self.parameters), ("gradients", self.gradients), ("optimizer (AdamW)", self.optimizer),
                ("gathered (FSDP2)", self.gathered),
                (f"activations ({'checkpointed' if checkpointed else 'kept'})", self.activations),
                ("activations without checkpointing", self.activations_without_checkpointing),
                ("loss (fused CE)", self.loss), ("reference model", self.reference), ("total per rank", self.device),
                ("host (CPU offload)", self.host)]
        lines = [f"  {name:<36} {format_bytes(value):>10}" for name, value in rows]
        if device_memory is not None:
            verdict = "fits" if self.device <= device_memory else "does NOT fit"
            lines.append(f"  {verdict} in {format_bytes(device_memory)} per device "
                         f"({100 * self.device / device_memory:.0f}% before allocator overhead)")
        return "\n".join(lines)


def format_bytes(n: int) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


class _FlashSaves(torch.autograd.Function):
    """Attention whose forward returns the output's shape and saves what flash attention saves."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the trace only counts
        raise NotImplementedError


def _flash_like(query, key, value, *args, **kwargs):
    return _FlashSaves.apply(query, key, value)


def saved_bytes(block: nn.Module, hidden: torch.Tensor, **kwargs) -> int:
    """Bytes autograd saves for the backward of one call of `block`: activations only (a saved weight, or a view of
    one, is the parameter itself, counted with the parameters; a tensor saved twice counts once)."""
    params = {id(p) for p in block.parameters()}
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor):
        if id(t) not in params and not (t._base is not None and id(t._base) in params):
            seen[(id(t), tuple(t.shape), t.dtype)] = t.numel() * t.element_size()
        return t

    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _flash_like
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block(hidden, **kwargs)
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
    return sum(seen.values())


def meta_model(source, shape, vocab_size: int | None = None) -> nn.Module:
    """The MTP model of a config's `model` source (or a frozen reference's) on the meta device: its shapes from its
    config alone (a directory's or GGUF file's config, or `from_scratch`), no weights read. `vocab_size`: the
    tokenizer's size for a from-scratch model."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from ..config import ConfigError
    from .build import resolve_model_path, secret
    from .meta import is_meta_checkpoint, meta_llama_config
    from .mtp import MTPModel

    with torch.device("meta"):
        scratch = getattr(source, "from_scratch", None)
        if scratch is not None:
            base = LlamaForCausalLM(LlamaConfig(
                vocab_size=vocab_size, hidden_size=scratch.hidden_size, intermediate_size=scratch.intermediate_size,
                num_hidden_layers=scratch.num_layers, num_attention_heads=scratch.num_attention_heads,
                num_key_value_heads=scratch.num_key_value_heads,
                max_position_embeddings=scratch.max_position_embeddings,
                tie_word_embeddings=scratch.tie_word_embeddings))
        elif is_meta_checkpoint(resolve_model_path(source.path)):
            config, _ = meta_llama_config(resolve_model_path(source.path))
            base = LlamaForCausalLM(config)
        else:
            path = resolve_model_path(source.path)
            try:
                if path.endswith(".gguf"):
                    directory, _, name = path.rpartition("/")
                    config = AutoConfig.from_pretrained(directory or ".", gguf_file=name)
                else:
                    config = AutoConfig.from_pretrained(path, token=secret(getattr(source, "hf_token", None)))
            except OSError as exc:
                raise ConfigError(f"model path {source.path}: {str(exc).splitlines()[0]}") from exc
            base = AutoModelForCausalLM.from_config(config)
        if shape is None:
            return base
        model = MTPModel.from_base(base, n_heads=shape.n_heads, head_type=shape.head_type)
        return model.set_trainable(shape.trainable)


def estimate(model: nn.Module, inputs: PlanInputs) -> MemoryPlan:
    """The plan of an MTP model built on the meta device (`meta_model`); the model is left in the compute dtype."""
    from .mtp import decoder_parts
    from .parallelize import blocks

    i = inputs
    shard = i.world_size if i.strategy == "fsdp2" else 1
    bytes_param = _BYTES[i.param_dtype]
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state = total * bytes_param // shard
    grads = trainable * bytes_param // shard
    optimizer = 2 * trainable * bytes_param // shard
    if i.strategy == "ddp" and i.world_size > 1:
        grads *= 2  # DDP's gradient buckets are a second copy
    host = 0
    if i.cpu_offload and i.strategy == "fsdp2":
        host, state, grads, optimizer = state + grads + optimizer, 0, 0, 0

    block_list = blocks(model)
    gather_dtype = i.gather_dtype or i.param_dtype
    gathered = 0
    if i.strategy == "fsdp2" and i.world_size > 1:
        # unsharded copies beside the local shards: the root's parameters and gradients for the whole step, two
        # blocks' parameters (computing and prefetched) and one block's gradients before its reduce-scatter
        in_blocks = {id(p) for b in block_list for p in b.parameters()}
        root = sum(p.numel() for p in model.parameters() if id(p) not in in_blocks)
        largest = max(sum(p.numel() for p in b.parameters()) for b in block_list)
        reduce_dtype = i.reduce_dtype or gather_dtype
        gathered = (root + 2 * largest) * _BYTES[gather_dtype] + (root + largest) * _BYTES[reduce_dtype]

    compute_dtype = i.autocast_dtype or gather_dtype
    inner, layers, norm = decoder_parts(model.base)
    d = model.config.hidden_size
    vocab = model.unembedding.weight.shape[0]
    b, s = i.micro_batch_size, i.seq_len
    with torch.device("meta"):
        model.to(compute_dtype)  # a meta model: no weights to copy, only the traced dtypes change
        hidden = torch.zeros(b, s, d, dtype=compute_dtype, requires_grad=True)
        kwargs = {}
        if hasattr(inner, "rotary_emb"):
            position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
            kwargs = {"position_embeddings": inner.rotary_emb(hidden, position_ids), "position_ids": position_ids,
                      "attention_mask": None}
        block_bytes = saved_bytes(layers[0], hidden, **kwargs)
        norm_bytes = saved_bytes(norm, hidden)
        head_bytes = 0
        if model.mtp_config.head_type == "linear" and len(model.heads):
            head_bytes = saved_bytes(model.heads[0], hidden)
        if model.mtp_config.head_type == "sequential" and len(model.heads):  # a decoder layer, two norms, the
            head_bytes = saved_bytes(model.heads[0], hidden, inputs_embeds=hidden, **kwargs)  # projection, a norm
    n_layers, n_extra = len(layers), len(model.heads)
    heads = model.n_heads
    input_bytes = b * s * d * _BYTES[compute_dtype]
    if model.mtp_config.head_type == "transformer":
        per_block = [block_bytes] * (n_layers + n_extra)
    else:
        per_block = [block_bytes] * n_layers + [head_bytes] * n_extra
    weight_copies = 0
    if i.autocast_dtype is not None and gather_dtype == torch.float32:  # autocast's cast weights, kept per block
        weight_copies = sum(sum(p.numel() for p in blk.parameters()) for blk in block_list) * _BYTES[i.autocast_dtype]
    heads_norm = heads * norm_bytes
    kept = sum(per_block) + heads_norm + weight_copies
    if i.checkpoint_every is None:
        activations = kept
    else:
        chosen = set(range(0, len(per_block), i.checkpoint_every))
        # kept: the checkpointed blocks' inputs; in the backward one block is recomputed and differentiated, its
        # activations and their gradients alive together
        activations = (sum(input_bytes if k in chosen else size for k, size in enumerate(per_block))
                       + 2 * max(per_block) + heads_norm
                       + weight_copies * (len(per_block) - len(chosen)) // max(len(per_block), 1))

    pairs = b * s * heads
    compute = _BYTES[compute_dtype]
    loss = (pairs * d * compute * 2  # the stacked hidden states and the selected rows
            + pairs * d * compute  # the saved gradient of the rows
            + vocab * d * 4  # the saved fp32 gradient of the unembedding
            + i.chunk_size * vocab * 4 + (0 if compute == 4 else i.chunk_size * vocab * compute))
    reference = 0
    if i.reference_params:
        reference = i.reference_params * _BYTES[i.reference_dtype] + i.chunk_size * vocab * 4 + b * s * d * 4
    return MemoryPlan(parameters=state, gradients=grads, optimizer=optimizer, gathered=gathered,
                      activations=activations, activations_without_checkpointing=kept, loss=loss,
                      reference=reference, host=host, params_total=total, blocks=len(per_block))


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token (forward and backward): 6 per parameter that multiplies activations (the
    embedding lookup excluded) plus attention's 12 · layers · d · seq_len (Kaplan et al. 2020; PaLM's MFU,
    Chowdhery et al. 2022), the extra transformer heads and sequential depths counted as layers."""
    from .mtp import decoder_parts

    inner, layers, _ = decoder_parts(model.base)
    embedding = inner.get_input_embeddings().weight
    dense = sum(p.numel() for p in model.parameters())
    if model.unembedding.weight is not embedding:
        dense -= embedding.numel()
    attention_layers = len(layers)
    if model.mtp_config.head_type in ("transformer", "sequential"):
        attention_layers += len(model.heads)
    return 6.0 * dense + 12.0 * attention_layers * model.config.hidden_size * seq_len


def plan_inputs(config, recipe, world_size: int) -> PlanInputs:
    """PlanInputs of a config and a recipe at `world_size` ranks."""
    from ..runtime.precision import DTYPES, dtype_or_none

    compute, fsdp = config.compute, config.compute.fsdp
    fsdp2 = compute.distributed == "fsdp2"
    return PlanInputs(
        world_size=world_size, strategy=compute.distributed, param_dtype=DTYPES[config.model.dtype],
        gather_dtype=dtype_or_none(fsdp.param_dtype) if fsdp2 else None,
        reduce_dtype=dtype_or_none(fsdp.reduce_dtype) if fsdp2 else None,
        autocast_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(compute.precision),
        cpu_offload=fsdp2 and fsdp.cpu_offload, checkpoint_every=compute.checkpoint_every,
        micro_batch_size=recipe.train.micro_batch_size, seq_len=recipe.data.max_length,
        chunk_size=recipe.loss.chunk_size)


def memory_plan(config, recipe, world_size: int, vocab_size: int | None = None,
                reference=None) -> tuple[MemoryPlan, float]:
    """The memory plan of a config and recipe at `world_size` ranks, and the model's training FLOPs per token.
    `vocab_size`: the tokenizer's size when the model is built from scratch (default: the trained tokenizer's
    configured size); `reference`: the source (path, dtype) of a frozen model that runs beside the trained one
    (`wmtp.weighting.frozen_model`: Rho-1's online reference), counted per rank."""
    from dataclasses import replace

    from ..runtime.precision import DTYPES

    source = config.model
    if source.from_scratch is not None and vocab_size is None:
        if source.train_tokenizer is not None:
            vocab_size = source.train_tokenizer.vocab_size
        else:
            from .build import load_tokenizer_from

            vocab_size = len(load_tokenizer_from(source.tokenizer))
    model = meta_model(source, recipe.mtp, vocab_size)
    inputs = plan_inputs(config, recipe, world_size)
    if reference is not None:
        ref = meta_model(reference, None)
        inputs = replace(inputs, reference_params=sum(p.numel() for p in ref.parameters()),
                         reference_dtype=DTYPES[reference.dtype])
    return estimate(model, inputs), flops_per_token(model, recipe.data.max_length)


# Dense bf16/fp16 tensor-core peaks per GPU (vendor datasheets, without sparsity), for MFU.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's dense peak FLOP/s for `compute.precision` bf16/fp16, when known; None otherwise (fp32, CPUs,
    unknown GPUs): MFU is then not reported rather than guessed."""
    if device.type != "cuda" or precision not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None
