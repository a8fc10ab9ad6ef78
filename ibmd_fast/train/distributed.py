"""Scale out with torch.distributed: launched by ``torchrun``, never by a home-made launcher.

``init(device)`` reads the variables torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)
and starts the default process group (NCCL on CUDA, Gloo on CPU) unless one is already up
(then it is used). Without those variables, or with ``WORLD_SIZE=1``, the trainers run as a
single process and every helper here is a no-op.

The group is started once per process and torn down at exit, not after each trainer call:
re-creating the default group in the same process reuses its rendezvous keys in torchrun's
store, and a fast rank can then read the previous group's stale addresses and hang. So
``train_teacher`` followed by ``distill`` in one torchrun worker share one group.

Conventions of the trainers: the batch size is global (each rank takes
``batch_size / world_size``); each rank seeds its own noise with ``seed + rank``; the data
is split by ``DistributedSampler``; rank 0 alone prints, writes stats, checkpoints and
releases; trained modules are wrapped in ``DistributedDataParallel``.
"""

from __future__ import annotations

import atexit
import datetime
import inspect
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ibmd_fast.device import resolve_device

__all__ = ["DistEnv", "init", "wrap_ddp", "unwrap", "local_batch_size"]


@dataclass
class DistEnv:
    """Where this process stands: rank, world size and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # -- collectives (no-ops in a single process)

    def barrier(self) -> None:
        if self.distributed:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sums of Python floats over ranks (float64 on the wire)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on some rank (keeps skip decisions in step)."""
        if not self.distributed:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def init(device: str = "auto") -> DistEnv:
    """Set up this process from torchrun's environment (or as a single process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        world_size, rank = dist.get_world_size(), dist.get_rank()
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    env = DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)
    if world_size > 1 and not dist.is_initialized():
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30), **kwargs)
        atexit.register(_destroy_at_exit)
    return env


def _destroy_at_exit() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(module: nn.Module, env: DistEnv, **kwargs) -> nn.Module:
    """``DistributedDataParallel(module)`` when there are several ranks, else ``module`` itself.

    Buffers are not synchronized at each forward (the U-Net has no running statistics; the
    bridge tables are identical on every rank), which saves a collective per forward.
    """
    if not env.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [env.device.index] if env.device.type == "cuda" else None
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        kwargs.setdefault("forward_sync_buffers", False)  # newer torch's name for the same switch
    else:
        kwargs.setdefault("broadcast_buffers", False)
    return DistributedDataParallel(module, device_ids=ids, **kwargs)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def local_batch_size(batch_size: int, env: DistEnv) -> int:
    """This rank's share of the global batch; an error unless it divides evenly."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if batch_size % env.world_size:
        raise ValueError(
            f"batch_size {batch_size} is global and must be divisible by the number of processes ({env.world_size})"
        )
    return batch_size // env.world_size
