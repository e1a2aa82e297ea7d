"""Many processes: `torchrun --nproc_per_node N -m fastdistil.train ...` (and multi-node torchrun).

The rank, world size and local rank come from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK):
no --local_rank flag. NCCL on GPUs, gloo on CPU. Without those variables everything here is a no-op for a
single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise mean over the processes."""
        if self.active:
            values = values.clone()
            dist.all_reduce(values)
            values /= self.size
        return values

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.active:
            values = values.clone()
            dist.all_reduce(values)
        return values

    def any(self, flag: bool, device) -> bool:
        """True on every process when it is True on any (so all of them take the same branch)."""
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def gather(self, obj) -> list:
        """Every process's `obj`, on every process."""
        if not self.active:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out


def setup(device_request: str | None) -> tuple[World, str]:
    """Join the process group when launched by torchrun; returns the world and the device to use."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(), device_request or ("cuda" if torch.cuda.is_available() else "cpu")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = (device_request or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return World(rank, size, local_rank), (f"cuda:{local_rank}" if use_cuda else "cpu")


def teardown(world: World) -> None:
    if world.active and dist.is_initialized():
        dist.destroy_process_group()


class ObjectiveModule(torch.nn.Module):
    """The student plus the objective, as one module DistributedDataParallel can wrap (the teacher is held
    outside: it is not trained and runs on every process). forward returns (total loss, {term: value})."""

    def __init__(self, student: torch.nn.Module, objective):
        super().__init__()
        self.student = student
        extra = objective.trainable()
        if extra is not None:  # registered here, so that the optimizer and DDP see its parameters too
            self.objective_state = extra
        self._objective = (objective,)

    def forward(self, input_ids, attention_mask, labels):
        losses = self._objective[0](input_ids, attention_mask, labels)
        return losses.total, losses.terms
