"""Per-feature statistics of a sparse code, accumulated over a stream of tokens in bounded memory.

``FeatureStats.update(values, indices, tokens)`` takes the sparse code of N tokens (``values``, ``indices`` [N, K];
a value <= 0 is not an activation) and their global token numbers [N], and keeps, per feature:

- the number of tokens it fired on, the sum and the largest of its activations;
- a histogram of its activations on a fixed logarithmic grid (``LOG_EDGES``: 20 bins per decade from 1e-6 to 1e6),
  which ``histogram`` re-bins to a few bins over the feature's own range;
- its ``n_top`` highest activations (ties: the earlier token first);
- a uniform sample of ``n_sample`` of its activations: the firings with the smallest *priority*, a fixed hash of
  (token, feature, seed). A bottom-m sample by a hash is a uniform sample without replacement, and it is the same
  whatever the batches, so a brute-force computation over all firings gives the same sample. ``intervals`` groups
  it by activation intervals (as SAE-Vis samples quantile intervals), so a page shows typical firing, not only the
  extremes.

Memory: O(n_features * (n_top + n_sample + grid bins)), whatever the number of tokens.
"""

from __future__ import annotations

import math

import torch

LOG_EDGES = torch.logspace(-6, 6, 241, dtype=torch.float64)  # 20 bins per decade
_MODULUS = 2_147_483_647  # 2^31 - 1: the Lehmer generator's prime; products stay below 2^62 in int64
_MULTIPLIER = 48_271


def priority(tokens: torch.Tensor, features: torch.Tensor, seed: int) -> torch.Tensor:
    """A pseudo-random int64 in [1, 2^31 - 1) for each (token, feature) pair, fixed by the seed: two Lehmer steps
    over a combination of the three (no int64 overflow: every product is below 2^62)."""
    h = (tokens.to(torch.int64) % _MODULUS * 69_069 + features.to(torch.int64) * 40_503 + seed * 7_919) % _MODULUS
    h = (h + 1) * _MULTIPLIER % _MODULUS
    h = (h ^ (h >> 13)) * _MULTIPLIER % _MODULUS
    return h + (h == 0).to(torch.int64)


def keep_first(features: torch.Tensor, key: torch.Tensor, tie: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the first ``n`` entries of each feature when entries are ordered by ``key`` ascending, then by
    ``tie`` ascending; returned grouped by feature, in that order."""
    order = torch.sort(tie, stable=True).indices
    order = order[torch.sort(key[order], stable=True).indices]
    order = order[torch.sort(features[order], stable=True).indices]
    f = features[order]
    first = torch.searchsorted(f, f, side="left")
    rank = torch.arange(f.numel()) - first
    return order[rank < n]


class _Table:
    """Per feature, the n entries smallest by (key, token): key [F, n], token [F, n], value [F, n]."""

    def __init__(self, n_features: int, n: int, key_dtype: torch.dtype) -> None:
        self.n = n
        self.key = torch.zeros(n_features, n, dtype=key_dtype)
        self.token = torch.full((n_features, n), -1, dtype=torch.int64)
        self.value = torch.zeros(n_features, n, dtype=torch.float32)

    def merge(self, feat: torch.Tensor, key: torch.Tensor, token: torch.Tensor, value: torch.Tensor) -> None:
        held = self.token >= 0
        rows = torch.arange(self.key.shape[0])[:, None].expand_as(self.key)
        feat = torch.cat([rows[held], feat])
        key = torch.cat([self.key[held], key])
        token = torch.cat([self.token[held], token])
        value = torch.cat([self.value[held], value])
        keep = keep_first(feat, key, token, self.n)
        f = feat[keep]
        rank = torch.arange(f.numel()) - torch.searchsorted(f, f, side="left")
        self.token.fill_(-1)
        self.key[f, rank], self.token[f, rank], self.value[f, rank] = key[keep], token[keep], value[keep]

    def entries(self, f: int) -> list[tuple[int, float]]:
        """(token, value) of feature f in table order."""
        held = int((self.token[f] >= 0).sum())
        return list(zip(self.token[f, :held].tolist(), self.value[f, :held].tolist(), strict=True))


class FeatureStats:
    def __init__(self, n_features: int, n_top: int = 20, n_sample: int = 100, seed: int = 0) -> None:
        self.n_features, self.seed = n_features, seed
        self.count = torch.zeros(n_features, dtype=torch.int64)
        self.total = torch.zeros(n_features, dtype=torch.float64)
        self.max = torch.zeros(n_features, dtype=torch.float32)
        self.grid = torch.zeros(n_features, len(LOG_EDGES) + 1, dtype=torch.int64)  # + under/overflow bins
        self.top = _Table(n_features, n_top, torch.float32)  # key = -value
        self.sample = _Table(n_features, n_sample, torch.int64)  # key = priority
        self.tokens = 0

    def update(self, values: torch.Tensor, indices: torch.Tensor, tokens: torch.Tensor) -> None:
        """values, indices [N, K] (the sparse code of N tokens), tokens [N] int64 (their global numbers)."""
        values, indices, tokens = values.detach().float().cpu(), indices.cpu().to(torch.int64), tokens.cpu()
        live = values > 0
        feat, val = indices[live], values[live]
        tok = tokens[:, None].expand_as(values)[live]
        self.tokens += values.shape[0]
        if feat.numel() == 0:
            return
        self.count += torch.bincount(feat, minlength=self.n_features)
        self.total.index_add_(0, feat, val.double())
        self.max.scatter_reduce_(0, feat, val, reduce="amax")
        bins = torch.bucketize(val.double(), LOG_EDGES)  # 0: below 1e-6, len(LOG_EDGES): above 1e6
        self.grid.view(-1).index_add_(0, feat * self.grid.shape[1] + bins, torch.ones_like(bins))
        self.top.merge(feat, -val, tok, val)
        self.sample.merge(feat, priority(tok, feat, self.seed), tok, val)

    # ---- results -----------------------------------------------------------------------------------------------

    def density(self) -> torch.Tensor:
        return self.count.double() / max(self.tokens, 1)

    def mean(self) -> torch.Tensor:
        """Mean activation over the tokens a feature fired on (nan for a feature that never fired)."""
        return torch.where(self.count > 0, self.total / self.count.clamp_min(1).double(), torch.nan)

    def histogram(self, f: int, max_bins: int = 24) -> dict[str, list]:
        """Feature f's activations in log-spaced bins over its own range (grid bins merged; at most max_bins)."""
        counts = self.grid[f]
        nonzero = counts.nonzero().squeeze(1)
        if nonzero.numel() == 0:
            return {"edges": [], "counts": []}
        lo, hi = int(nonzero[0]), int(nonzero[-1]) + 1  # grid bins [lo, hi)
        width = max(1, math.ceil((hi - lo) / max_bins))
        edges_full = torch.cat([LOG_EDGES[:1] / 10, LOG_EDGES, LOG_EDGES[-1:] * 10])  # edges of grid bins 0..end
        starts = list(range(lo, hi, width))
        return {"edges": [float(edges_full[b]) for b in starts] + [float(edges_full[min(hi, starts[-1] + width)])],
                "counts": [int(counts[b:b + width].sum()) for b in starts]}

    def top_entries(self, f: int) -> list[tuple[int, float]]:
        """(token, value) of feature f's highest activations, highest first (ties: earlier token)."""
        return self.top.entries(f)

    def sample_entries(self, f: int) -> list[tuple[int, float]]:
        """(token, value) of feature f's uniform sample, in priority order."""
        return self.sample.entries(f)

    def intervals(self, f: int, n_intervals: int = 4, per_interval: int = 5) -> list[dict]:
        """The sample grouped by activation intervals (i/n, (i+1)/n] x max, highest interval first: label, range and
        up to per_interval (token, value) examples each (in priority order, i.e. random)."""
        peak = float(self.max[f])
        if peak <= 0:
            return []
        out = []
        for i in reversed(range(n_intervals)):
            lo, hi = peak * i / n_intervals, peak * (i + 1) / n_intervals
            picked = [(t, v) for t, v in self.sample_entries(f) if lo < v <= hi][:per_interval]
            out.append({"label": f"{i / n_intervals:.0%}-{(i + 1) / n_intervals:.0%} of max", "range": [lo, hi],
                        "examples": picked})
        return out
