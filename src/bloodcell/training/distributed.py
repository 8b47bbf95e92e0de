"""Distributed helpers (torchrun, DistributedDataParallel; gloo on CPU), as in torchvision's references/classification/utils.py."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> tuple[Dist, torch.device]:
    """Join the process group when started by torchrun; CUDA when present, else CPU."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        import torch.distributed as dist

        info = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend)
        device = torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return info, device
    return Dist(), torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync_buffers(model: nn.Module, dist_info: Dist) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics).

    DDP keeps parameters identical through gradient averaging and broadcasts
    buffers before each forward, but the last step's running statistics are
    each rank's own; this makes them agree before evaluation and saving.
    """
    if dist_info.world > 1:
        import torch.distributed as dist

        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def all_reduce_sum(values: torch.Tensor, dist_info: Dist) -> torch.Tensor:
    if dist_info.world > 1:
        import torch.distributed as dist

        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values
