"""torchrun integration and memory techniques, applied from outside the model: process group, device, DDP or
FSDP2 wrapping (with mixed precision and CPU offload), activation checkpointing.

With WORLD_SIZE > 1 (torchrun), gloo on CPU and NCCL on CUDA. Each rank sees the same data order and takes
its slice of every global micro-batch; loss normalisers and metrics are all-reduced; rank 0 alone logs and
writes. Both DDP and FSDP2 average gradients over ranks, so the trainer scales each rank's loss by the
world size to recover the global-normalised sum.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """`compute.device`: cuda (this process's GPU), mps (Apple silicon), cpu, or auto (CUDA, else MPS, else CPU)."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("compute.device is cuda but no CUDA device is available")
        return torch.device("cuda", local_rank)
    if requested == "mps" or (requested == "auto" and mps_available()):
        if not mps_available():
            raise RuntimeError("compute.device is mps but MPS is not available (it needs Apple silicon, macOS 12.3+ "
                               "and a PyTorch built with MPS)")
        return torch.device("mps")
    return torch.device("cpu")


def init_distributed(requested_device: str, timeout_minutes: float = 30.0) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested_device, local_rank)
    if world > 1 and device.type == "mps":
        raise RuntimeError("torchrun with MPS is not supported (one Apple GPU, no collective backend): run one "
                           "process, or set compute.device: cpu")
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistInfo(rank, world, local_rank, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(value, info: DistInfo):
    if not info.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks, in order: its decoder layers, then its extra heads."""
    from .model import _decoder_parts

    _, layers, _ = _decoder_parts(model.base)
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
    """DDP, or FSDP2 when distributed: each decoder layer and each transformer head sharded, then the root, with
    a mixed-precision policy (parameters gathered in `param_dtype`, gradients reduced in `reduce_dtype`; None
    keeps the parameters' own) and parameters, gradients and optimizer state optionally kept on the CPU."""
    if not info.distributed:
        return model
    if strategy == "ddp":
        ids = [info.device.index] if info.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    options = {"mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
               "offload_policy": CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload
               else OffloadPolicy()}
    if model.mtp_config.head_type == "transformer":
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


def all_gather_concat(values: torch.Tensor, info: DistInfo) -> tuple[torch.Tensor, int]:
    """Concatenate a 1-D tensor of any length from every rank, in rank order; and this rank's offset in it."""
    if not info.distributed:
        return values, 0
    sizes = torch.zeros(info.world_size, dtype=torch.long, device=values.device)
    sizes[info.rank] = values.numel()
    dist.all_reduce(sizes)
    padded = torch.zeros(int(sizes.max()), dtype=values.dtype, device=values.device)
    padded[:values.numel()] = values
    chunks = [torch.empty_like(padded) for _ in range(info.world_size)]
    dist.all_gather(chunks, padded)
    gathered = torch.cat([chunk[:int(n)] for chunk, n in zip(chunks, sizes, strict=True)])
    return gathered, int(sizes[:info.rank].sum())
