"""Thematic anchors (Lorsa paper Section 5.3, Figure 6): Lorsa heads that read one keyword position from many later
positions. The paper finds them by inspection; here a score measures it.

For a head h on a sequence, let Q be the ordinary positions where h is active (in the top K with z > 0) and
c_ij = A_ij v_j its z pattern (Section 4.1). The sequence's broadcast is

    B = max_j  sum_{i in Q, i - j >= gap} |c_ij|  /  sum_{i in Q} sum_j |c_ij|

over ordinary source positions j (the prefix, where attention sinks point, is not a keyword): the share of all the
z-pattern mass of the head's activations on that sequence that one position at least `gap` tokens back sends. A
head's score is the mean of B over the sequences where it is active at `min_queries` positions or more. A head that
reads its previous token (gap excluded), a different earlier token at each position (induction) or the first token
(a sink) scores low; one keyword read from every later position of the sentence scores near 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ranklens.dictionaries.lorsa import Lorsa
from ranklens.lm.capture import Capturer
from ranklens.lm.load import LoadedModel

__all__ = ["BroadcastScores", "broadcast_scores"]

GAP = 4
MIN_QUERIES = 3


@dataclass
class BroadcastScores:
    """score [H]: mean broadcast over the counted sequences (NaN where none); sequences [H]: how many were counted;
    best [H]: the index of each head's highest-broadcast sequence (-1: none)."""

    score: torch.Tensor
    sequences: torch.Tensor
    best: torch.Tensor


@torch.no_grad()
def sequence_broadcast(lorsa: Lorsa, x: torch.Tensor, prefix: int, gap: int = GAP,
                       min_queries: int = MIN_QUERIES) -> tuple[torch.Tensor, torch.Tensor]:
    """(B [H], counted [H] bool) of one sequence x [T, d] (the layer's attention input)."""
    H, T = lorsa.n_heads, x.shape[0]
    out = lorsa(x[None])
    values, indices = out.values[0], out.indices[0]  # [T, K]
    live = values > 0
    live[:prefix] = False
    queries = torch.arange(T, device=x.device)[:, None].expand_as(indices)[live]
    heads = indices[live]
    B = torch.zeros(H, dtype=torch.float64)
    n_queries = torch.bincount(heads.cpu(), minlength=H)
    counted = n_queries >= min_queries
    if heads.numel() == 0:
        return B, counted
    rows = lorsa.z_rows(x, heads, queries).abs().double()  # [m, T]
    j = torch.arange(T, device=x.device)
    far = ((queries[:, None] - j[None, :]) >= gap) & (j[None, :] >= prefix)
    mass = torch.zeros(H, T, dtype=torch.float64, device=x.device).index_add_(0, heads, rows * far)
    total = torch.zeros(H, dtype=torch.float64, device=x.device).index_add_(0, heads, rows.sum(-1))
    B = (mass.max(-1).values / total.clamp_min(1e-30)).cpu()
    return torch.where(counted, B, torch.zeros_like(B)), counted


@torch.no_grad()
def broadcast_scores(lm: LoadedModel, lorsa: Lorsa, layer: int, sequences: list[list[int]], prefix: int,
                     gap: int = GAP, min_queries: int = MIN_QUERIES) -> BroadcastScores:
    """Every head's broadcast score over `sequences` (token ids, unpadded)."""
    H = lorsa.n_heads
    site = f"L{layer}.attn_in"
    capture = Capturer(lm.arch, [site])
    total = torch.zeros(H, dtype=torch.float64)
    count = torch.zeros(H, dtype=torch.long)
    best_value = torch.full((H,), -1.0, dtype=torch.float64)
    best = torch.full((H,), -1, dtype=torch.long)
    for s, ids in enumerate(sequences):
        x = capture(torch.tensor([ids], device=lm.device))[site][0].to(lorsa.W_V.dtype)
        B, counted = sequence_broadcast(lorsa, x, prefix, gap, min_queries)
        total += B
        count += counted.long()
        better = counted & (best_value < B)
        best_value = torch.where(better, B, best_value)
        best = torch.where(better, torch.full_like(best, s), best)
    score = torch.where(count > 0, total / count.clamp_min(1), torch.full((H,), float("nan"), dtype=torch.float64))
    return BroadcastScores(score, count, best)
