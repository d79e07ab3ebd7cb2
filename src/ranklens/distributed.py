"""Data-parallel jobs under torchrun: the process group from torchrun's environment, and the merge of every rank's
covariance accumulators on rank 0.

``torchrun --nproc_per_node N -m ranklens.cli spectrum ...`` starts N processes with RANK, WORLD_SIZE, LOCAL_RANK and
MASTER_ADDR/PORT set; ``init_from_env`` joins them into one process group (NCCL for CUDA, gloo for the CPU). A
spectrum job then deals its batches round-robin over the ranks, and ``gather_accumulators`` brings each site's
per-rank (n, mean, M2) to rank 0, which merges them with the Chan et al. formula of
``ranklens.spectrum.accumulator`` (M2 does not combine by a plain all_reduce SUM). Without torchrun (WORLD_SIZE unset
or 1) every function here is a no-op and a job runs as one process.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist

from ranklens.errors import RanklensError
from ranklens.spectrum.accumulator import CovarianceAccumulator


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


def gather_accumulators(accs: Sequence[CovarianceAccumulator]) -> list[CovarianceAccumulator] | None:
    """On rank 0: each accumulator merged over the ranks in rank order (rank 0's first); None on the other ranks.
    Every rank passes its accumulators in the same order, with the same dimensions. One gather per tensor, so rank 0
    holds world x d x d float64 at a time."""
    rank, size = world()
    if size == 1:
        return list(accs)
    merged: list[CovarianceAccumulator] | None = [] if rank == 0 else None
    comm_device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    for acc in accs:
        state = acc.state_dict()
        parts = {}
        for key in ("mean", "scatter"):
            tensor = state[key].to(comm_device or state[key].device).contiguous()
            bucket = [torch.empty_like(tensor) for _ in range(size)] if rank == 0 else None
            dist.gather(tensor, bucket, dst=0)
            parts[key] = bucket
        counts = torch.tensor([state["n"], state["n_excluded"]], dtype=torch.int64, device=comm_device)
        count_bucket = [torch.empty_like(counts) for _ in range(size)] if rank == 0 else None
        dist.gather(counts, count_bucket, dst=0)
        if rank == 0:
            assert merged is not None and count_bucket is not None
            pieces = [CovarianceAccumulator.from_state_dict(
                {"n": int(c[0]), "n_excluded": int(c[1]), "mean": parts["mean"][r].to(acc.device),
                 "scatter": parts["scatter"][r].to(acc.device)}, norm_clip_sigma=acc.norm_clip_sigma,
                device=acc.device, gram_dtype=acc.gram_dtype) for r, c in enumerate(count_bucket)]
            merged.append(CovarianceAccumulator.merge_all(pieces))
    return merged
