"""torchrun integration and memory techniques, applied from outside the model: process group, device, DDP or
FSDP2 wrapping (with mixed precision and CPU offload), activation checkpointing.

With WORLD_SIZE > 1 (torchrun), gloo on CPU and NCCL on CUDA. Each rank sees the same data order and takes
its slice of every global micro-batch; loss normalisers and metrics are all-reduced; rank 0 alone logs and
writes. Both DDP and FSDP2 average gradients over ranks, so the trainer scales each rank's loss by the
world size to recover the global-normalised sum.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.utils.checkpoint


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


def finish_together(info: DistInfo) -> None:
    """A barrier at the end of a command that succeeded on every rank: no rank tears its process group down while
    another still works on it (rank 0 writes the final model and the summary alone; a rank that left first could
    abort at exit, "terminate called without an active exception", under gloo on a loaded machine)."""
    if info.distributed:
        dist.barrier()


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
