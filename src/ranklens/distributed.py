"""Data-parallel jobs under torchrun: the process group from torchrun's environment, and rank 0's errors for all.

``torchrun --nproc_per_node N -m ranklens.cli spectrum ...`` starts N processes with RANK, WORLD_SIZE, LOCAL_RANK and
MASTER_ADDR/PORT set; ``init_from_env`` joins them into one process group (NCCL for CUDA, gloo for the CPU). Without
torchrun (WORLD_SIZE unset or 1) every function here is a no-op and a job runs as one process.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ranklens.errors import RanklensError


def world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def rank_device(device: str) -> str:
    """This rank's device: ``cuda`` becomes ``cuda:LOCAL_RANK`` inside a process group; anything else is unchanged."""
    if device == "cuda" and world()[1] > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def init_from_env(device: str) -> bool:
    """Join torchrun's process group when WORLD_SIZE > 1 (NCCL when `device` is CUDA, gloo otherwise); True if this
    process is then one of several ranks."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return False
    if not dist.is_available():
        raise RanklensError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if not dist.is_initialized():
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return True


def shutdown() -> None:
    """Leave the process group (after a job; torchrun warns about groups left open)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_error(message: str | None) -> None:
    """Rank 0's error (or None) reaches every rank, which raises it: a check made on rank 0 alone (a run
    directory holding another run, say) stops the whole job instead of leaving the other ranks waiting."""
    rank, size = world()
    if size == 1:
        if message is not None:
            raise RanklensError(message)
        return
    box = [message if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise RanklensError(box[0])
