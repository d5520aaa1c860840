"""Data-parallel training across processes started by `accelerate launch` or `torchrun`.

Each process trains the same adapter on its share of the batches (`TrainingData.shard_plan`); after each
backward pass the adapter gradients are averaged over all processes, so every process takes the same
optimizer step and the adapters stay identical (checked at the end by comparing checksums). Only the
first process writes files. The launcher's environment (`WORLD_SIZE`, `RANK`, `LOCAL_RANK`,
`MASTER_ADDR`, `MASTER_PORT`) is all that is read; one process (the hosts' case) needs none of it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from ..errors import SdtuneError

__all__ = ["DataParallel", "data_parallel_from_env"]


@dataclass(frozen=True)
class DataParallel:
    """This process's place in a data-parallel run (world 1 = a plain single-process run)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Average the gradients of `params` over all processes (a no-op for one process)."""
        if self.world <= 1:
            return
        import torch.distributed as dist

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(self.world)

    def any_true(self, flag: bool, device: torch.device) -> bool:
        """True on every process if `flag` is true on any (e.g. a cancel request seen by one)."""
        if self.world <= 1:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def check_identical(self, tensors: Mapping[str, torch.Tensor]) -> str:
        """The checksum of the adapter; raises if any process holds different weights."""
        digest = hashlib.sha256()
        for key in sorted(tensors):
            digest.update(key.encode())
            digest.update(tensors[key].detach().float().cpu().contiguous().numpy().tobytes())
        mine = digest.hexdigest()[:16]
        if self.world <= 1:
            return mine
        import torch.distributed as dist

        everyone: list = [None] * self.world
        dist.all_gather_object(everyone, mine)
        if len(set(everyone)) != 1:
            raise SdtuneError(f"data-parallel processes ended with different adapter weights ({everyone}); "
                              "the run is not trustworthy, please report it")
        return mine


def data_parallel_from_env(device_type: str) -> DataParallel:
    """Join the process group the launcher set up (gloo on CPU, nccl on CUDA), or a single-process run."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return DataParallel()
    import torch.distributed as dist

    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", rank=rank, world_size=world)
    return DataParallel(rank, world, local)
