"""The spectrum job's merge over torchrun ranks: every rank's covariance accumulators brought to rank 0.

``gather_accumulators`` brings each site's per-rank (n, mean, M2) to rank 0, which merges them with the Chan et al.
formula of ``ranklens.linalg.accumulator`` (M2 does not combine by a plain all_reduce SUM).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from ranklens.distributed import world
from ranklens.linalg.accumulator import CovarianceAccumulator


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
    # Every rank's sends are retired before any rank leaves: the other ranks exit now while rank 0 works on, and a
    # rank tearing its group down with a gather in flight aborted once in gloo (CI, 2026-12-06).
    dist.barrier()
    return merged
