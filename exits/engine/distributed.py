"""Distributed data parallel set-up: one process per device, launched by ``torchrun``.

``torchrun --nproc_per_node K -m ...`` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT for every process; :func:`init_distributed` reads them and joins the process
group (NCCL on CUDA, gloo on CPU). A process group that the caller already initialised
(``torch.multiprocessing.spawn`` + ``init_process_group``) is used as it is. A plain
``python`` launch is a single process: world size 1, no process group.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from exits.engine.device import resolve_device

__all__ = ["DistInfo", "init_distributed", "cleanup_distributed", "barrier", "all_gather_objects", "is_main_process"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job. ``device`` is this process's own device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes checkpoints, logs and progress bars."""
        return self.rank == 0


def _process_device(device_name: str, local_rank: int) -> torch.device:
    device = resolve_device(device_name)
    if device.type == "cuda":
        # One GPU per process: local rank k drives GPU k of its node.
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def init_distributed(device: str = "auto") -> DistInfo:
    """Join (or reuse) the process group and return this process's :class:`DistInfo`.

    Distributed when torch.distributed is already initialised, or when the environment says
    WORLD_SIZE > 1 (torchrun); then the backend is NCCL for CUDA devices, gloo for CPU.
    Idempotent: a second call reuses the group the first one created.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        return DistInfo(rank, world_size, local_rank, _process_device(device, local_rank))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(0, 1, 0, resolve_device(device))
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world_size} but this torch build has no torch.distributed")
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    process_device = _process_device(device, local_rank)
    backend = "nccl" if process_device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    logger.debug("joined process group: rank %d/%d, backend %s, device %s", rank, world_size, backend, process_device)
    return DistInfo(rank, world_size, local_rank, process_device)


def is_main_process() -> bool:
    """True in rank 0 of a process group and in a process without one: the process that
    writes a stage's final model and logs its summary."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def cleanup_distributed() -> None:
    """Leave the process group (no-op when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op in a single process)."""
    if info.distributed:
        dist.barrier()


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    if not info.distributed:
        return [obj]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered
