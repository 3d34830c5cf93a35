"""Parallelism applied from outside the model: DDP or FSDP2 wrapping (mixed precision, CPU offload), activation
checkpointing, and filling a sharded model from rank 0's copy."""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch import nn

from ..runtime.distributed import DistInfo


def blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks, in order: its decoder layers, then its extra heads."""
    from .mtp import decoder_parts

    _, layers, _ = decoder_parts(model.base)
    return [*layers, *model.heads]


def apply_activation_checkpointing(model: nn.Module, every: int | None) -> int:
    """Recompute the activations of every `every`-th block (decoder layers and extra heads, counted together from
    the first) in the backward instead of keeping them; None: none. Done in place on each block's forward, so the
    parameter names (and checkpoints) do not change, and before FSDP2 wraps the blocks, so its gathers surround the
    recomputation. Returns the number of blocks checkpointed."""
    if every is None:
        return 0
    chosen = blocks(model)[::every]
    for block in chosen:
        block.forward = functools.partial(_checkpointed, block.forward)
    return len(chosen)


def _checkpointed(forward, *args, **kwargs):
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def wrap_model(model: nn.Module, info: DistInfo, strategy: str, *, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype | None = None, cpu_offload: bool = False) -> nn.Module:
    """DDP, or FSDP2 when distributed: each decoder layer and each transformer head or sequential depth sharded,
    then the root, with a mixed-precision policy (parameters gathered in `param_dtype`, gradients reduced in
    `reduce_dtype`; None keeps the parameters' own) and parameters, gradients and optimizer state optionally kept
    on the CPU."""
    if not info.distributed:
        return model
    if strategy == "ddp":
        ids = [info.device.index] if info.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    options = {"mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
               "offload_policy": CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload
               else OffloadPolicy()}
    if model.mtp_config.head_type in ("transformer", "sequential"):  # each sequential depth one unit
        for block in blocks(model):
            fully_shard(block, **options)
    fully_shard(model, **options)
    return model


def load_from_rank0(model: nn.Module, full: nn.Module | None, info: DistInfo, *, cpu_offload: bool = False) -> None:
    """Fill a model sharded on the meta device: its storage is allocated on this rank's device (or CPU with
    offload), rank 0's full copy `full` (on its CPU; None elsewhere) is scattered so that each rank receives
    only its shards, and the buffers (rotary tables, ...) are broadcast whole."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device=torch.device("cpu") if cpu_offload else info.device)
    state = full.state_dict() if full is not None else {}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    own = dict(full.named_buffers()) if full is not None else {}
    for name, buffer in model.named_buffers():
        if full is not None:
            buffer.copy_(own[name])
        dist.broadcast(buffer, src=0)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def gradient_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if enabled:
        return contextlib.nullcontext()
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2

        @contextlib.contextmanager
        def no_sync():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

        return no_sync()
    return contextlib.nullcontext()
