"""Streaming, mergeable mean and covariance of activation vectors (float64), for the spectra of paper Section 4.

The paper (Section 4.1) analyses the singular values of the mean-centered activation matrix A~ in R^{n x d}, one row per
token, over 10 million tokens per site (Section 4.2). ranklens never materializes A~: since A~^T A~ = M2, the centered
scatter matrix sum_i (x_i - mean)(x_i - mean)^T, the singular values are s_k = sqrt(eig_k(M2)) = sqrt(n * lambda_k) with
lambda_k the eigenvalues of the ddof=0 covariance M2 / n (see ``ranklens.linalg.basis``). This module accumulates
(n, mean, M2) batch by batch, with O(d^2) state and O(chunk x d) scratch memory.

Update formula: Chan, Golub & LeVeque's pairwise combination ("Updating formulae and a pairwise algorithm for computing
sample variances", 1979), used both for every batch and for ``merge``::

    n    = n_a + n_b
    dlt  = mean_b - mean_a
    mean = mean_a + dlt * n_b / n
    M2   = M2_a + M2_b + dlt dlt^T * n_a n_b / n

where a chunk's own (mean_b, M2_b) come from an exact two-pass computation in float64 on the chunk (its mean, then the
Gram matrix of the rows centered on it). Why this and not shifted sums (S1 = sum(x - ref), S2 = sum (x - ref)(x - ref)^T
with ref fixed at the first batch's mean): both are exact in exact arithmetic, but shifted sums recover the covariance
as S2/n - (S1/n)(S1/n)^T, which cancels catastrophically when the running mean drifts far from ref relative to the
spread (an unrepresentative first batch, e.g. a bos-heavy one, or two shards merged with very different refs must be
re-shifted by the same subtraction). The pairwise update only ever adds centered, positive semi-definite terms (M2_a,
M2_b, and a rank-one term with a positive weight), so no subtraction of large nearly-equal numbers happens at any
point, whatever the data's mean; and the same formula serves ``update`` and ``merge``, so a merged result is the one
pass result up to float64 rounding regardless of where each part started. Cost: one extra rank-one d x d update per
chunk, negligible beside the chunk's d x d Gram matrix.

Outlier exclusion (paper footnote 3: "we exclude activations whose norms exceed 5 sigma from the mean"): the bound
mean(||x||) + k * std(||x||) must be known before a row is accumulated, so it needs the norm statistics first. Collect
them with ``NormStats`` in a first pass over the data (exact, two passes) or over a prefix of it (one and a bit passes,
an estimate), then feed ``update(x, norm_bounds=stats)`` to an accumulator built with ``norm_clip_sigma=5.0``. The
caller chooses; this module does not read data twice by itself. Rows are dropped on the upper side only (norms above
the bound): footnote 3 is about outliers that *inflate* variance, and a norm far below the mean cannot do that.
Dropped rows are counted in ``n_excluded``.

Distributed runs: each rank accumulates its shard; ``state_dict()`` gives plain tensors and ints (save with
safetensors after wrapping the ints, or all_gather); ``merge``/``merge_all`` combine the parts. Note that (n, mean, M2)
do not combine by a plain sum (all_reduce SUM), they combine by ``merge``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ranklens.errors import RanklensError

__all__ = ["CovarianceAccumulator", "NormStats"]

_GRAM_BLOCK = 96
_DEFAULT_CHUNK_BYTES = 64 << 20  # float64 scratch per chunk (the upcast rows); 64 MiB = 2048 rows at d = 4096


def _as_device(device: torch.device | str | None) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def _rows(x: torch.Tensor, d: int | None, what: str) -> torch.Tensor:
    """Validate activations [..., d] (any float dtype) and view them as rows [b, d]."""
    if not isinstance(x, torch.Tensor):
        raise RanklensError(f"{what}: expected a torch.Tensor of shape [batch, d], got {type(x).__name__}")
    if x.ndim < 2:
        raise RanklensError(
            f"{what}: expected activations of shape [batch, d] (or [..., d]), got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise RanklensError(f"{what}: expected a floating-point tensor, got dtype {x.dtype}")
    if d is not None and x.shape[-1] != d:
        raise RanklensError(f"{what}: expected last dimension d={d}, got shape {tuple(x.shape)}")
    return x.reshape(-1, x.shape[-1])


def _chunk_rows(d: int, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // (8 * max(d, 1)))


def _check_finite(chunk: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(chunk).all()):
        bad = int((~torch.isfinite(chunk)).any(dim=-1).sum())
        raise RanklensError(f"{what}: {bad} row(s) contain NaN or inf; expected finite activations")


def symmetric_gram(y: torch.Tensor, block: int = _GRAM_BLOCK) -> torch.Tensor:
    """Y^T Y for Y [n, d], computing only the block rows of the upper triangle (about half the FLOPs of ``Y.T @ Y``).

    Block row i is one product Y[:, i:i+b]^T Y[:, i:] ([b, d - i]); the upper triangle is then mirrored into the
    lower one. Each entry is the same dot product ``Y.T @ Y`` computes, so the precision is the product's own; the
    result is exactly symmetric. ``block`` trades the saved FLOPs ((d + b) / 2d of them are done)
    against smaller products (bench/README.md has the measurement behind the default).
    """
    d = y.shape[1]
    upper = torch.empty(d, d, dtype=y.dtype, device=y.device)
    for i in range(0, d, block):
        upper[i : i + block, i:] = y[:, i : i + block].T @ y[:, i:]
    return upper.triu() + upper.triu(1).T


class NormStats:
    """Streaming count, mean and M2 of activation norms ||x||_2, for the 5-sigma exclusion of paper footnote 3.

    Mergeable with the scalar form of the Chan et al. pairwise formula (see the module docstring). ``std`` is the
    population standard deviation (ddof=0); with the millions of tokens the paper uses (Section 4.2) the choice does
    not matter, and it keeps ``merge`` exact.
    """

    def __init__(self, *, chunk_bytes: int = _DEFAULT_CHUNK_BYTES) -> None:
        self._n = 0
        self._mean = 0.0
        self._m2 = 0.0
        self._chunk_bytes = int(chunk_bytes)

    @property
    def n(self) -> int:
        return self._n

    @property
    def mean(self) -> float:
        """Mean of ||x||; RanklensError before any row was seen."""
        if self._n == 0:
            raise RanklensError("NormStats.mean: no rows seen yet (n=0); expected at least one update")
        return self._mean

    @property
    def std(self) -> float:
        """Population standard deviation (ddof=0) of ||x||."""
        if self._n == 0:
            raise RanklensError("NormStats.std: no rows seen yet (n=0); expected at least one update")
        return math.sqrt(max(self._m2, 0.0) / self._n)

    def upper_bound(self, sigma: float = 5.0) -> float:
        """mean(||x||) + sigma * std(||x||): rows with a larger norm are outliers in the sense of footnote 3."""
        if not (isinstance(sigma, int | float) and math.isfinite(sigma) and sigma > 0):
            raise RanklensError(
                f"norm clip sigma={sigma!r}: expected a positive finite number (the paper uses 5)"
            )
        return self.mean + float(sigma) * self.std

    def _combine(self, n_b: int, mean_b: float, m2_b: float) -> None:
        if n_b == 0:
            return
        n = self._n + n_b
        delta = mean_b - self._mean
        self._mean += delta * (n_b / n)
        self._m2 += m2_b + delta * delta * (self._n * n_b / n)
        self._n = n

    def update_norms(self, norms: torch.Tensor) -> NormStats:
        """Add precomputed norms [b] (any float dtype)."""
        if not isinstance(norms, torch.Tensor) or norms.ndim != 1 or not norms.is_floating_point():
            shape = tuple(norms.shape) if isinstance(norms, torch.Tensor) else type(norms).__name__
            raise RanklensError(f"NormStats.update_norms: expected a 1-D float tensor of norms, got {shape}")
        if norms.numel() == 0:
            return self
        v = norms.detach().to(torch.float64)
        _check_finite(v[:, None], "NormStats.update_norms")
        mean_b = float(v.mean())
        m2_b = float(((v - mean_b) ** 2).sum())
        self._combine(int(v.numel()), mean_b, m2_b)
        return self

    def update(self, x: torch.Tensor) -> NormStats:
        """Add the norms of activation rows x [b, d] (or [..., d]); upcast to float64 chunk by chunk."""
        rows = _rows(x, None, "NormStats.update")
        step = _chunk_rows(rows.shape[1], self._chunk_bytes)
        for i in range(0, rows.shape[0], step):
            chunk = rows[i : i + step].detach().to(torch.float64)
            self.update_norms(torch.linalg.vector_norm(chunk, dim=1))
        return self

    def merge_(self, other: NormStats) -> NormStats:
        """In place: self becomes the statistics over the union of both (disjoint) data sets."""
        if not isinstance(other, NormStats):
            raise RanklensError(f"NormStats.merge: expected a NormStats, got {type(other).__name__}")
        self._combine(other._n, other._mean, other._m2)
        return self

    def merge(self, other: NormStats) -> NormStats:
        out = NormStats(chunk_bytes=self._chunk_bytes)
        out._n, out._mean, out._m2 = self._n, self._mean, self._m2
        return out.merge_(other)

    def state_dict(self) -> dict[str, Any]:
        return {"n": self._n, "mean": self._mean, "m2": self._m2}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> NormStats:
        missing = {"n", "mean", "m2"} - set(state)
        if missing:
            raise RanklensError(f"NormStats state is missing {sorted(missing)}; expected keys n, mean, m2")
        out = cls()
        out._n, out._mean, out._m2 = int(state["n"]), float(state["mean"]), float(state["m2"])
        if out._n < 0:
            raise RanklensError(f"NormStats state n={out._n}: expected a count >= 0")
        return out

    def __repr__(self) -> str:
        if self._n == 0:
            return "NormStats(n=0)"
        return f"NormStats(n={self._n}, mean={self._mean:.6g}, std={self.std:.6g})"


class CovarianceAccumulator:
    """Streaming float64 count, mean and centered scatter M2 of d-dimensional rows; mergeable (Chan et al.).

    Feeds the spectrum statistics of paper Section 4 (Definition 4.1, Section 4.3, Section 4.4, Appendix C) and the
    active subspace of ASI (Section 5.2, Appendix K) without materializing the n x d activation matrix. See the module
    docstring for the choice of update formula and for the footnote-3 outlier exclusion.

    Args:
        d: dimension of the rows.
        norm_clip_sigma: if set (the paper uses 5.0, footnote 3), ``update`` drops rows with
            ||x|| > mean(||x||) + norm_clip_sigma * std(||x||) and must be given ``norm_bounds``.
        device: where the float64 state lives (CPU by default; CUDA works the same way).
        chunk_bytes: bound on the float64 scratch memory per chunk of an incoming batch.
        gram_dtype: dtype of each chunk's centering and Gram matrix (the state is float64 either way). float64 is
            exact to rounding; float32 is ~3x faster on CPUs and keeps singular values above 1% of the largest
            within 1e-6 relative, but the tail near 1e-3 of the largest only within ~2e-3 (tests measure both).
    """

    def __init__(
        self,
        d: int,
        *,
        norm_clip_sigma: float | None = None,
        device: torch.device | str | None = None,
        chunk_bytes: int = _DEFAULT_CHUNK_BYTES,
        gram_dtype: torch.dtype = torch.float64,
    ) -> None:
        if gram_dtype not in (torch.float64, torch.float32):
            raise RanklensError(f"gram_dtype={gram_dtype}: expected torch.float64 or torch.float32")
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise RanklensError(
                f"CovarianceAccumulator d={d!r}: expected a positive int (the activation dimension)"
            )
        if norm_clip_sigma is not None and not (
            isinstance(norm_clip_sigma, int | float)
            and math.isfinite(norm_clip_sigma)
            and norm_clip_sigma > 0
        ):
            raise RanklensError(
                f"norm_clip_sigma={norm_clip_sigma!r}: expected None or a positive finite number (the paper uses 5)"
            )
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
            raise RanklensError(f"chunk_bytes={chunk_bytes!r}: expected a positive int")
        self._d = d
        self._device = _as_device(device)
        self.norm_clip_sigma = None if norm_clip_sigma is None else float(norm_clip_sigma)
        self._chunk_bytes = chunk_bytes
        self.gram_dtype = gram_dtype
        self._n = 0
        self._n_excluded = 0
        self._mean = torch.zeros(d, dtype=torch.float64, device=self._device)
        self._m2 = torch.zeros(d, d, dtype=torch.float64, device=self._device)

    # ---------------------------------------------------------------- properties

    @property
    def d(self) -> int:
        return self._d

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def n(self) -> int:
        """Number of rows accumulated (excluded outliers not counted)."""
        return self._n

    @property
    def n_excluded(self) -> int:
        """Number of rows dropped by the footnote-3 norm bound."""
        return self._n_excluded

    @property
    def mean(self) -> torch.Tensor:
        """Mean of the accumulated rows, [d] float64 (a copy)."""
        if self._n == 0:
            raise RanklensError(
                "CovarianceAccumulator.mean: no rows accumulated (n=0); expected at least one row"
            )
        return self._mean.clone()

    @property
    def scatter(self) -> torch.Tensor:
        """M2 = sum_i (x_i - mean)(x_i - mean)^T = A~^T A~, [d, d] float64 (a copy); zeros when n=0."""
        return self._m2.clone()

    def covariance(self, ddof: int = 0) -> torch.Tensor:
        """M2 / (n - ddof), [d, d] float64. ddof=0 (default) is the convention of s_k = sqrt(n * lambda_k)."""
        if isinstance(ddof, bool) or not isinstance(ddof, int) or ddof < 0:
            raise RanklensError(f"covariance ddof={ddof!r}: expected an int >= 0")
        if self._n - ddof <= 0:
            raise RanklensError(f"covariance(ddof={ddof}) of n={self._n} rows: expected n > ddof")
        return self._m2 / (self._n - ddof)

    # ---------------------------------------------------------------- accumulation

    def _combine(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        """Chan et al. pairwise update of (n, mean, M2) with a part (n_b, mean_b, M2_b); all float64 on self.device."""
        if n_b == 0:
            return
        n_a = self._n
        n = n_a + n_b
        if n_a == 0:
            self._mean = mean_b.clone()
            self._m2 = m2_b.clone()
        else:
            delta = mean_b - self._mean
            self._mean.add_(delta, alpha=n_b / n)
            self._m2.add_(m2_b).addr_(delta, delta, alpha=n_a * n_b / n)
        self._n = n

    def _resolve_bound(self, norm_bounds: NormStats | float | None) -> float | None:
        if norm_bounds is None:
            if self.norm_clip_sigma is not None:
                raise RanklensError(
                    f"norm_clip_sigma={self.norm_clip_sigma} needs norm_bounds: pass the NormStats of a first pass "
                    "(or of a prefix) to update(), or build the accumulator with norm_clip_sigma=None"
                )
            return None
        if isinstance(norm_bounds, NormStats):
            if self.norm_clip_sigma is None:
                raise RanklensError(
                    "update(norm_bounds=NormStats) needs norm_clip_sigma: build the accumulator with "
                    "norm_clip_sigma=5.0 (paper footnote 3) or pass an absolute norm bound as a float"
                )
            return norm_bounds.upper_bound(self.norm_clip_sigma)
        if (
            isinstance(norm_bounds, int | float)
            and not isinstance(norm_bounds, bool)
            and not math.isnan(norm_bounds)
        ):
            return float(norm_bounds)
        raise RanklensError(
            f"norm_bounds={norm_bounds!r}: expected None, a NormStats, or a float (the largest norm kept)"
        )

    def update(self, x: torch.Tensor, norm_bounds: NormStats | float | None = None) -> CovarianceAccumulator:
        """Add rows x [b, d] (or [..., d]; any float dtype), upcast to float64 chunk by chunk.

        ``norm_bounds`` applies the footnote-3 exclusion: a ``NormStats`` (bound = mean + norm_clip_sigma * std of the
        norms; needs ``norm_clip_sigma``) or a float (the largest norm kept). Rows above the bound are dropped and
        counted in ``n_excluded``. Returns self.
        """
        rows = _rows(x, self._d, "CovarianceAccumulator.update")
        bound = self._resolve_bound(norm_bounds)
        step = _chunk_rows(self._d, self._chunk_bytes)
        for i in range(0, rows.shape[0], step):
            part = rows[i : i + step].detach()
            chunk = part.to(device=self._device, dtype=self.gram_dtype)  # one cast: mixed-dtype ops are slow on CPU
            if bound is not None:
                keep = torch.linalg.vector_norm(chunk, dim=1) <= bound
                n_keep = int(keep.sum())
                self._n_excluded += chunk.shape[0] - n_keep
                if n_keep < chunk.shape[0]:
                    chunk = chunk[keep]
            if chunk.shape[0] == 0:
                continue
            # two-pass on the chunk: its mean, then the Gram matrix of the rows centered on it; a non-finite row
            # makes the mean non-finite, so checking the mean (d values) replaces a pass over the chunk
            mean_b = chunk.mean(dim=0)
            if not bool(torch.isfinite(mean_b).all()):
                _check_finite(chunk, "CovarianceAccumulator.update")
            own = chunk.data_ptr() != part.data_ptr()  # never center the caller's tensor in place
            centered = chunk.sub_(mean_b) if own else chunk - mean_b
            self._combine(chunk.shape[0], mean_b.double(), symmetric_gram(centered).double())
        return self

    # ---------------------------------------------------------------- merging and state

    def merge_(self, other: CovarianceAccumulator) -> CovarianceAccumulator:
        """In place: self becomes the accumulator over the union of both (disjoint) data sets. Returns self."""
        if not isinstance(other, CovarianceAccumulator):
            raise RanklensError(
                f"CovarianceAccumulator.merge: expected a CovarianceAccumulator, got {type(other).__name__}"
            )
        if other._d != self._d:
            raise RanklensError(f"CovarianceAccumulator.merge: d={other._d} does not match d={self._d}")
        self._combine(
            other._n,
            other._mean.to(device=self._device, dtype=torch.float64),
            other._m2.to(device=self._device, dtype=torch.float64),
        )
        self._n_excluded += other._n_excluded
        return self

    def merge(self, other: CovarianceAccumulator) -> CovarianceAccumulator:
        """A new accumulator over the union of both (disjoint) data sets; neither input changes."""
        return self.copy().merge_(other)

    @classmethod
    def merge_all(cls, accs: Iterable[CovarianceAccumulator]) -> CovarianceAccumulator:
        """Merge many parts (e.g. one per rank or per shard) into a new accumulator; the inputs do not change."""
        parts = list(accs)
        if not parts:
            raise RanklensError(
                "CovarianceAccumulator.merge_all: expected at least one accumulator, got none"
            )
        out = parts[0].copy()
        for part in parts[1:]:
            out.merge_(part)
        return out

    def copy(self) -> CovarianceAccumulator:
        out = CovarianceAccumulator(
            self._d, norm_clip_sigma=self.norm_clip_sigma, device=self._device, chunk_bytes=self._chunk_bytes,
            gram_dtype=self.gram_dtype,
        )
        out._n, out._n_excluded = self._n, self._n_excluded
        out._mean, out._m2 = self._mean.clone(), self._m2.clone()
        return out

    def to(self, device: torch.device | str) -> CovarianceAccumulator:
        """Move the state to ``device`` in place. Returns self."""
        self._device = _as_device(device)
        self._mean = self._mean.to(self._device)
        self._m2 = self._m2.to(self._device)
        return self

    def state_dict(self) -> dict[str, Any]:
        """{'n': int, 'n_excluded': int, 'mean': [d] float64, 'scatter': [d, d] float64} (CPU tensors).

        For safetensors, wrap the ints as tensors (``from_state_dict`` accepts 0-d or 1-element tensors for them).
        """
        return {
            "n": self._n,
            "n_excluded": self._n_excluded,
            "mean": self._mean.detach().cpu().clone(),
            "scatter": self._m2.detach().cpu().clone(),
        }

    @classmethod
    def from_state_dict(
        cls,
        state: Mapping[str, Any],
        *,
        norm_clip_sigma: float | None = None,
        device: torch.device | str | None = None,
        chunk_bytes: int = _DEFAULT_CHUNK_BYTES,
        gram_dtype: torch.dtype = torch.float64,
    ) -> CovarianceAccumulator:
        """Rebuild an accumulator from ``state_dict()`` output (ints may be tensors, e.g. after safetensors)."""
        missing = {"n", "mean", "scatter"} - set(state)
        if missing:
            raise RanklensError(
                f"accumulator state is missing {sorted(missing)}; expected keys n, mean, scatter"
            )
        mean, m2 = state["mean"], state["scatter"]
        if not isinstance(mean, torch.Tensor) or mean.ndim != 1 or mean.numel() == 0:
            raise RanklensError(
                f"accumulator state 'mean': expected a 1-D tensor [d], got {getattr(mean, 'shape', mean)!r}"
            )
        d = mean.shape[0]
        if not isinstance(m2, torch.Tensor) or tuple(m2.shape) != (d, d):
            raise RanklensError(
                f"accumulator state 'scatter': expected a [{d}, {d}] tensor, got {getattr(m2, 'shape', m2)!r}"
            )
        n = _as_int(state["n"], "n")
        n_excluded = _as_int(state.get("n_excluded", 0), "n_excluded")
        out = cls(d, norm_clip_sigma=norm_clip_sigma, device=device, chunk_bytes=chunk_bytes, gram_dtype=gram_dtype)
        out._n, out._n_excluded = n, n_excluded
        out._mean = mean.detach().to(device=out._device, dtype=torch.float64).clone()
        out._m2 = m2.detach().to(device=out._device, dtype=torch.float64).clone()
        return out

    def __repr__(self) -> str:
        return (
            f"CovarianceAccumulator(d={self._d}, n={self._n}, n_excluded={self._n_excluded}, "
            f"norm_clip_sigma={self.norm_clip_sigma}, device={self._device})"
        )


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise RanklensError(
                f"accumulator state '{name}': expected one integer, got a tensor of shape {tuple(value.shape)}"
            )
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value or value < 0:
        raise RanklensError(f"accumulator state '{name}'={value!r}: expected an integer count >= 0")
    return int(value)


def accumulate(x: torch.Tensor | Iterable[torch.Tensor]) -> CovarianceAccumulator:
    """The accumulator of activations x [..., d], or of a stream of such chunks (never stacked)."""
    acc = None
    for chunk in [x] if isinstance(x, torch.Tensor) else x:
        rows = chunk.reshape(-1, chunk.shape[-1])
        acc = acc or CovarianceAccumulator(rows.shape[-1])
        acc.update(rows)
    if acc is None or acc.n == 0:
        raise RanklensError("no activations given; expected a tensor [n, d] or an iterable of such chunks")
    return acc
