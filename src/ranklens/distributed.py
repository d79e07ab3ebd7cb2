"""Data-parallel jobs under torchrun: the process group from torchrun's environment, and rank 0's errors for all.

``torchrun --nproc_per_node N -m ranklens.cli spectrum ...`` starts N processes with RANK, WORLD_SIZE, LOCAL_RANK and
MASTER_ADDR/PORT set; ``init_from_env`` joins them into one process group (NCCL for CUDA, gloo for the CPU). Without
torchrun (WORLD_SIZE unset or 1) every function here is a no-op and a job runs as one process.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from ranklens.config import Config
from ranklens.errors import RanklensError
from ranklens.rundir import open_run_dir


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


@contextlib.contextmanager
def process_group(device: str) -> Iterator[bool]:
    """torchrun's process group around one job; yields whether this process is one of several ranks (False, and
    nothing to do, outside torchrun).

    Every rank destroys the group when its job ends (torchrun warns about groups left open). No barrier first:
    ``spectrum``'s rank 0 works alone after the last collective (statistics, comparisons, the report), for longer than
    a collective's timeout on big models, so a job ending in an asymmetric collective retires it with a barrier of its
    own (``ranklens.spectrum.distributed.gather_accumulators``).
    """
    distributed = init_from_env(device)
    try:
        yield distributed
    finally:
        if distributed and dist.is_initialized():
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


class Layout:
    """How a training run spreads over the torchrun ranks: ``data`` replicas, each training on its share of every
    global batch, times ``shards`` blocks of features, each rank of a replica holding one contiguous block of the
    dictionary (``ranklens.train.sharded``). Rank r is replica r // shards and block r % shards. One process is the
    layout 1 x 1, where every method is a no-op.

    Collectives: ``data_sum_`` adds a tensor over the replicas of one block (gradients, token counts, firing masks);
    ``shard_sum_`` and ``shard_gather`` work over the blocks of one replica (the sharded forward)."""

    def __init__(self, shards: int = 1) -> None:
        self.rank, self.world = world()
        if shards < 1 or self.world % shards:
            raise RanklensError(f"--shards {shards} does not divide the {self.world} ranks; expected a divisor")
        self.shards, self.data = shards, self.world // shards
        self.data_rank, self.shard_rank = divmod(self.rank, shards)
        self._data_group = self._shard_group = None
        if self.world > 1:
            # Every rank creates every group, in the same order (torch.distributed's rule).
            for s in range(shards):
                group = dist.new_group([d * shards + s for d in range(self.data)])
                if s == self.shard_rank:
                    self._data_group = group
            for d in range(self.data):
                group = dist.new_group([d * shards + s for s in range(shards)])
                if d == self.data_rank:
                    self._shard_group = group

    @property
    def main(self) -> bool:
        return self.rank == 0

    def data_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.data > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self._data_group)
        return tensor

    def shard_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.shards > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self._shard_group)
        return tensor

    def shard_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every block's tensor of the same shape, in block order (one block: [tensor])."""
        if self.shards == 1:
            return [tensor]
        out = [torch.empty_like(tensor) for _ in range(self.shards)]
        dist.all_gather(out, tensor.contiguous(), group=self._shard_group)
        return out

    def split(self, n: int, what: str) -> slice:
        """This replica's rows of a global batch of n rows (contiguous, equal shares)."""
        if n % self.data:
            raise RanklensError(f"{what} {n} does not divide among {self.data} data-parallel ranks; expected a "
                                "multiple of the number of replicas")
        share = n // self.data
        return slice(self.data_rank * share, (self.data_rank + 1) * share)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


@contextlib.contextmanager
def ranked_run_dir(out: str | Path, config: Config, job: str, layout: Layout) -> Iterator[Path]:
    """The run directory of a job on every rank: rank 0 checks, locks and prepares it (``open_run_dir``) and holds
    it until the block ends; the other ranks wait for rank 0's verdict, whose error stops them all."""
    if layout.world == 1:
        with open_run_dir(out, config, job) as run_dir:
            yield run_dir
        return
    with contextlib.ExitStack() as held:
        error = None
        if layout.main:
            try:
                held.enter_context(open_run_dir(out, config, job))
            except RanklensError as err:
                error = str(err)
        broadcast_error(error)
        yield Path(out)
