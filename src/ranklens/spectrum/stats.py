"""Spectrum statistics of mean-centered activations built on ``ranklens.linalg`` (paper Section 4, Appendix C): the
share of singular values above a level, cumulative variance, the per-site summary, stability over splits, and the
Section 4.4 variance decomposition.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ranklens.errors import RanklensError
from ranklens.linalg.accumulator import CovarianceAccumulator, accumulate
from ranklens.linalg.basis import checked_singular_values, effective_rank, singular_values, symmetrize

__all__ = [
    "coefficient_of_variation",
    "cumulative_variance",
    "frac_sv_above",
    "spectrum_summary",
    "stability_summary",
    "variance_decomposition",
]


def frac_sv_above(s: torch.Tensor | Sequence[float], rel: float = 0.01) -> float:
    """Share of singular values strictly above rel * max(s) (Section 4.3: "exceed 1% of the maximum"; footnote 4).

    The denominator is all d singular values, zeros included. Returns 0.0 when all s are 0.
    """
    t = checked_singular_values(s, "frac_sv_above")
    if not (isinstance(rel, int | float) and not isinstance(rel, bool) and math.isfinite(rel) and rel >= 0):
        raise RanklensError(f"frac_sv_above rel={rel!r}: expected a finite number >= 0 (0.01 for 1%)")
    top = float(t.max())
    if top == 0.0:
        return 0.0
    return float((t > rel * top).sum()) / t.numel()


def cumulative_variance(s: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """cumsum(s^2) / sum(s^2), [d] float64: variance explained by the top-k components (footnote 5: s_k^2 / n is
    the variance along singular direction k). Zeros when all s are 0."""
    t = checked_singular_values(s, "cumulative_variance")
    sq = t * t
    total = sq.sum()
    if float(total) == 0.0:
        return torch.zeros_like(sq)
    return torch.cumsum(sq, 0) / total


def spectrum_summary(acc: CovarianceAccumulator, *, rtol: float | None = None) -> dict[str, Any]:
    """JSON-ready summary of an accumulator's spectrum (Section 4.1 and 4.3).

    Keys: d, n_tokens, effective_rank, erank_fraction, frac_sv_above_1pct, singular_values (list, descending),
    cumulative_variance (list), n_excluded (rows dropped by the footnote-3 norm bound).
    """
    if not isinstance(acc, CovarianceAccumulator):
        raise RanklensError(f"spectrum_summary: expected a CovarianceAccumulator, got {type(acc).__name__}")
    s = singular_values(acc, rtol=rtol)
    erank = effective_rank(s)
    return {
        "d": acc.d,
        "n_tokens": acc.n,
        "effective_rank": erank,
        "erank_fraction": erank / acc.d,
        "frac_sv_above_1pct": frac_sv_above(s, 0.01),
        "singular_values": s.tolist(),
        "cumulative_variance": cumulative_variance(s).tolist(),
        "n_excluded": acc.n_excluded,
    }


# --------------------------------------------------------------------------- stability (Appendix C)


def spectrum_of(x: torch.Tensor | Iterable[torch.Tensor]) -> dict[str, Any]:
    """The spectrum record `ranklens spectrum` writes for a site (effective rank and its fraction, the share of
    singular values above 1% of the largest, singular values, cumulative variance, ...), for activations x [n, d] or
    a stream of such chunks. It is also ``ranklens.spectrum(x)``."""
    return spectrum_summary(accumulate(x))


def coefficient_of_variation(values: torch.Tensor | Sequence[Any], ddof: int = 0) -> torch.Tensor:
    """std / mean over the first axis of values [k, ...], float64 (Appendix C).

    Uses the population standard deviation (ddof=0) by default. Appendix C does not say which; we take the CV as a
    description of the k runs at hand rather than an estimate of a wider population's spread, and ddof=0 is also
    numpy's ``np.std`` default, the likeliest convention behind the paper's numbers. With k=5 runs, ddof=1 gives
    values sqrt(5/4) = 1.118 times larger; pass ddof=1 for it. Where the mean is 0 the CV is inf or NaN.
    """
    t = torch.as_tensor(values).detach().to(torch.float64)
    if t.ndim < 1 or t.shape[0] < 1:
        raise RanklensError(
            f"coefficient_of_variation: expected values of shape [k, ...] with k >= 1, got {tuple(t.shape)}"
        )
    if isinstance(ddof, bool) or not isinstance(ddof, int) or not 0 <= ddof < t.shape[0]:
        raise RanklensError(
            f"coefficient_of_variation ddof={ddof!r}: expected an int with 0 <= ddof < k={t.shape[0]}"
        )
    return torch.std(t, dim=0, correction=ddof) / t.mean(dim=0)


def stability_summary(
    accs: Sequence[CovarianceAccumulator], *, sv_rel: float = 1e-3, ddof: int = 0
) -> dict[str, Any]:
    """Stability of the spectrum across k disjoint splits of the data (Appendix C: 5 splits of 10M tokens).

    Returns the per-split effective ranks with their mean, std and CV, and the max and mean CV across singular values.
    Singular values are compared as s_k / sqrt(n) (the standard deviation along component k, footnote 5), which equals
    comparing s_k when all splits have the same n as in the paper and removes the sqrt(n) scale otherwise. Only
    components whose mean across splits exceeds ``sv_rel`` (1e-3) of the largest enter the CV: tiny singular values
    have meaningless CVs. Standard deviations use ``ddof`` (0, see ``coefficient_of_variation``).
    """
    parts = list(accs)
    if len(parts) < 2:
        raise RanklensError(f"stability_summary: got {len(parts)} accumulator(s); expected at least 2 splits")
    for i, acc in enumerate(parts):
        if not isinstance(acc, CovarianceAccumulator):
            raise RanklensError(
                f"stability_summary: item {i} is a {type(acc).__name__}; expected a CovarianceAccumulator"
            )
        if acc.d != parts[0].d:
            raise RanklensError(
                f"stability_summary: split {i} has d={acc.d}; expected d={parts[0].d} like split 0"
            )
    sv = torch.stack([singular_values(acc) for acc in parts])  # [k, d]
    eranks = torch.tensor([effective_rank(row) for row in sv], dtype=torch.float64)
    sd = torch.stack([row / math.sqrt(acc.n) for row, acc in zip(sv, parts, strict=True)])  # [k, d]
    mean_sd = sd.mean(dim=0)
    keep = mean_sd > sv_rel * mean_sd.max()
    sv_cv = coefficient_of_variation(sd[:, keep], ddof=ddof)
    erank_std = float(torch.std(eranks, correction=ddof))
    erank_mean = float(eranks.mean())
    return {
        "n_splits": len(parts),
        "n_tokens": [acc.n for acc in parts],
        "effective_ranks": eranks.tolist(),
        "erank_mean": erank_mean,
        "erank_std": erank_std,
        "erank_cv": erank_std / erank_mean if erank_mean > 0 else float("nan"),
        "sv_cv_max": float(sv_cv.max()),
        "sv_cv_mean": float(sv_cv.mean()),
        "n_sv_compared": int(keep.sum()),
        "ddof": ddof,
    }


# --------------------------------------------------------------------------- W_O decomposition (Section 4.4)


def variance_decomposition(
    cov_z: torch.Tensor | CovarianceAccumulator, W_O: torch.Tensor, directions: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Split the variance of the attention output O along unit directions into Z's and W^O's parts (Section 4.4).

    The paper writes O = Z W^O with row vectors Z [n, dz] and W^O [dz, d]. ``W_O`` here is in torch ``nn.Linear``
    layout [d_model, dz] (O = Z W_O^T), so the paper's W^O = W_O^T and, for a unit direction e (a column of
    ``directions`` [d_model, m], e.g. eigenvectors of the O accumulator, since cov_O = W_O cov_Z W_O^T):

        v = W^O e = W_O^T e  [dz],   Var(O e) = v^T cov_Z v = Var(Z v_hat) * ||v||^2,  v_hat = v / ||v||.

    Returns float64 tensors [m]: ``var_O`` = Var(O e) (computed as v^T cov_Z v), ``contrib_Z`` = Var(Z v_hat) (the
    "contribution of Z"), ``contrib_WO`` = ||v||^2 (the "contribution of W^O"); contrib_Z * contrib_WO = var_O. Where
    v = 0, contrib_Z is undefined and set to 0 (and contrib_WO = var_O = 0). ``cov_z`` is the covariance of Z (any
    ddof; var_O has the same), or an accumulator of Z (ddof=0). Directions must have unit norm (1e-4 tolerance).
    """
    if isinstance(cov_z, CovarianceAccumulator):
        cov_z = cov_z.covariance(ddof=0)
    for name, t in (("cov_z", cov_z), ("W_O", W_O), ("directions", directions)):
        if not isinstance(t, torch.Tensor) or t.ndim != 2:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise RanklensError(f"variance_decomposition: {name} must be a 2-D tensor, got {shape}")
    dz = cov_z.shape[0]
    if cov_z.shape[1] != dz:
        raise RanklensError(
            f"variance_decomposition: cov_z must be square [dz, dz], got {tuple(cov_z.shape)}"
        )
    if W_O.shape[1] != dz:
        raise RanklensError(
            f"variance_decomposition: W_O has shape {tuple(W_O.shape)}; expected nn.Linear layout [d_model, dz={dz}]"
        )
    if directions.shape[0] != W_O.shape[0]:
        raise RanklensError(
            f"variance_decomposition: directions has shape {tuple(directions.shape)}; expected [d_model={W_O.shape[0]}, m]"
        )
    cz = symmetrize(cov_z.detach().to(torch.float64))
    w = W_O.detach().to(device=cz.device, dtype=torch.float64)
    e = directions.detach().to(device=cz.device, dtype=torch.float64)
    norms = torch.linalg.vector_norm(e, dim=0)
    bad = (norms - 1).abs() > 1e-4
    if bool(bad.any()):
        j = int(bad.nonzero()[0])
        raise RanklensError(
            f"variance_decomposition: direction {j} has norm {float(norms[j]):.6g}; expected unit vectors"
        )
    v = w.T @ e  # [dz, m]; v = W^O e in the paper's notation
    contrib_wo = (v * v).sum(dim=0)
    var_o = (v * (cz @ v)).sum(dim=0)
    vnorm = torch.sqrt(contrib_wo)
    nonzero = vnorm > 0
    v_hat = torch.where(nonzero, v / torch.where(nonzero, vnorm, torch.ones_like(vnorm)), torch.zeros_like(v))
    contrib_z = (v_hat * (cz @ v_hat)).sum(dim=0)
    return {"var_O": var_o, "contrib_Z": contrib_z, "contrib_WO": contrib_wo}
