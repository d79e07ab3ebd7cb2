"""The n highest activations of every feature (Lorsa head, SAE latent) over a stream of tokens, in bounded memory.

Lorsa paper Section 4.1 ("Top Activations"): iterate over held-out activations and keep the 16 highest-activating
tokens of each head. ``TopActivations`` keeps, per feature, a running top-n table (values [F, n], the token's
location and the token ids of a context window around it), merged with each batch's sparse code: memory is
O(F * n * window) whatever the number of tokens streamed, and the batch is never densified to [tokens, F].

Merging is one sort of the table's entries plus the batch's candidates: by value (descending), then stably by feature,
so each feature's entries are contiguous and ordered; the first n of each feature are kept. Ties keep the earlier
entry (the table's, then the batch's in token order), so results are deterministic.
"""

from __future__ import annotations

import torch

from ranklens.errors import RanklensError

__all__ = ["TopActivations", "context_windows"]


def context_windows(input_ids: torch.Tensor, before: int, after: int, pad: int = -1) -> torch.Tensor:
    """[B, T, before + 1 + after] token ids around every position (``pad`` outside the sequence); the position itself
    is at index ``before``."""
    B, T = input_ids.shape
    padded = torch.full((B, before + T + after), pad, dtype=input_ids.dtype, device=input_ids.device)
    padded[:, before : before + T] = input_ids
    return padded.unfold(1, before + 1 + after, 1)  # [B, T, W]


class TopActivations:
    """Running top-``n_top`` activations per feature (see the module docstring).

    ``values`` [F, n] float32 (-inf where empty), ``locations`` [F, n, 2] int64 (sequence index, position; -1 where
    empty) and ``contexts`` [F, n, W] int64 token ids (-1 outside the sequence or where empty)."""

    def __init__(self, n_features: int, n_top: int = 16, window: int = 17) -> None:
        for name, v in (("n_features", n_features), ("n_top", n_top), ("window", window)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise RanklensError(f"{name}={v!r}: expected a positive int")
        self.n_features, self.n_top, self.window = n_features, n_top, window
        self.values = torch.full((n_features, n_top), -torch.inf)
        self.locations = torch.full((n_features, n_top, 2), -1, dtype=torch.int64)
        self.contexts = torch.full((n_features, n_top, window), -1, dtype=torch.int64)

    def update(self, values: torch.Tensor, indices: torch.Tensor, locations: torch.Tensor,
               contexts: torch.Tensor) -> None:
        """values, indices [N, K]: the sparse code of N tokens (entries with value <= 0 are not activations);
        locations [N, 2] int64; contexts [N, window] int64."""
        N, K = values.shape
        if indices.shape != values.shape or locations.shape != (N, 2) or contexts.shape != (N, self.window):
            raise RanklensError(
                f"TopActivations.update: values {tuple(values.shape)}, indices {tuple(indices.shape)}, locations "
                f"{tuple(locations.shape)}, contexts {tuple(contexts.shape)}; expected [N, K], [N, K], [N, 2], "
                f"[N, {self.window}]")
        live = values > 0
        rows = torch.arange(N, device=values.device)[:, None].expand(N, K)[live].cpu()
        feat_new = indices[live].cpu().to(torch.int64)
        val_new = values[live].detach().float().cpu()
        held = torch.isfinite(self.values)
        feat_old = torch.arange(self.n_features)[:, None].expand_as(self.values)[held]
        feat = torch.cat([feat_old, feat_new])
        val = torch.cat([self.values[held], val_new])
        loc = torch.cat([self.locations[held], locations.cpu()[rows]])
        ctx = torch.cat([self.contexts[held], contexts.cpu()[rows]])
        order = torch.sort(val, descending=True, stable=True).indices
        order = order[torch.sort(feat[order], stable=True).indices]
        feat, val, loc, ctx = feat[order], val[order], loc[order], ctx[order]
        first = torch.searchsorted(feat, feat, side="left")  # index of each feature's first entry
        rank = torch.arange(feat.numel()) - first
        keep = rank < self.n_top
        f, r = feat[keep], rank[keep]
        self.values.fill_(-torch.inf)
        self.locations.fill_(-1)
        self.contexts.fill_(-1)
        self.values[f, r] = val[keep]
        self.locations[f, r] = loc[keep]
        self.contexts[f, r] = ctx[keep]

    def feature(self, f: int) -> list[dict]:
        """The entries of feature ``f``, highest first: value, sequence, position, context token ids."""
        held = torch.isfinite(self.values[f])
        return [{"value": float(self.values[f, i]), "sequence": int(self.locations[f, i, 0]),
                 "position": int(self.locations[f, i, 1]),
                 "context_ids": [int(t) for t in self.contexts[f, i].tolist()]}
                for i in range(int(held.sum()))]
