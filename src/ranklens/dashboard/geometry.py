"""What a feature's decoder row says on its own: its nearest features, its share inside the active subspace, and
its direct effect on the logits. Each is computed in chunks of rows, so a million features never form a
[features, features] or [features, vocabulary] matrix at once.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ranklens.lm.load import LoadedModel

_CHUNK_ELEMENTS = 1 << 24  # ~64 MB of float32 scratch per chunk


def _chunks(n_rows: int, width: int) -> Iterator[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(width, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


def unit_rows(w: torch.Tensor) -> torch.Tensor:
    w = w.detach().float()
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def neighbours(w: torch.Tensor, k: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The k features whose decoder rows have the largest cosine with each row (itself excluded): (ids [F, k],
    cosines [F, k]); fewer than k columns when there are fewer other features."""
    unit = unit_rows(w)
    n = unit.shape[0]
    k = min(k, n - 1)
    ids = torch.zeros(n, k, dtype=torch.int64)
    cos = torch.zeros(n, k)
    for rows in _chunks(n, n):
        sims = unit[rows] @ unit.T
        sims[torch.arange(sims.shape[0]), torch.arange(rows.start, rows.stop)] = -torch.inf
        cos[rows], ids[rows] = sims.topk(k, dim=1)
    return ids, cos


@torch.no_grad()
def subspace_share(w: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """||V^T w||^2 / ||w||^2 per decoder row: the share of its squared norm inside span(V), V [d, m] orthonormal."""
    w = w.detach().double()
    inside = (w @ basis.double()).pow(2).sum(1)
    return (inside / w.pow(2).sum(1).clamp_min(1e-300)).float()


def logit_directions(lm: LoadedModel) -> tuple[torch.Tensor, torch.Tensor | None, str] | None:
    """(unembedding [vocab, d], the final norm's scale or None, a sentence on how the norm is treated), or None
    for a model without an output embedding (an encoder)."""
    head = lm.model.get_output_embeddings() if hasattr(lm.model, "get_output_embeddings") else None
    if head is None or not lm.arch.causal:
        return None
    norm = lm.arch.final_norm
    scale = getattr(norm, "weight", None)
    centred = isinstance(norm, nn.LayerNorm)
    note = ("Logit effect = W_U (gamma * w): the decoder row through the final norm's scale gamma and the "
            "unembedding; the norm's division by the token's RMS is left out (it depends on the token, not the "
            "feature)")
    if centred:
        note += ", and the row is centred first as LayerNorm centres its input"
    return head.weight.detach(), None if scale is None else scale.detach(), note + "."


@torch.no_grad()
def logit_effects(w: torch.Tensor, unembed: torch.Tensor, scale: torch.Tensor | None, *, centred: bool = False,
                  k: int = 10, bins: int = 30) -> Iterator[tuple[int, list, list, dict]]:
    """Per feature: (id, top-k promoted (token id, effect), top-k suppressed, histogram of its effects over the whole
    vocabulary), a chunk of rows at a time."""
    u = unembed.float()
    for rows in _chunks(w.shape[0], u.shape[0]):
        d = w[rows].detach().float()
        if centred:
            d = d - d.mean(dim=1, keepdim=True)
        if scale is not None:
            d = d * scale.float()
        effects = d @ u.T  # [chunk, vocab]
        up_v, up_i = effects.topk(k, dim=1)
        down_v, down_i = (-effects).topk(k, dim=1)
        lo, hi = effects.min(dim=1).values, effects.max(dim=1).values
        for r in range(effects.shape[0]):
            span = (float(lo[r]), float(hi[r]) if hi[r] > lo[r] else float(lo[r]) + 1e-12)
            counts = torch.histc(effects[r], bins=bins, min=span[0], max=span[1])
            edges = torch.linspace(span[0], span[1], bins + 1)
            yield (rows.start + r, list(zip(up_i[r].tolist(), up_v[r].tolist(), strict=True)),
                   list(zip(down_i[r].tolist(), (-down_v[r]).tolist(), strict=True)),
                   {"edges": edges.tolist(), "counts": [int(c) for c in counts.tolist()]})
