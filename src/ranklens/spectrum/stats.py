"""Spectrum statistics of mean-centered activations: effective rank and friends (paper Section 4, Appendix C).

Everything here is a pure function of a ``CovarianceAccumulator`` (or of a covariance and a count, or of a vector of
singular values). The n x d matrix A~ of mean-centered activations (Section 4.1) is never built: its singular values
are s_k = sqrt(n * lambda_k), lambda_k the eigenvalues of the ddof=0 covariance, computed with ``torch.linalg.eigh``
in float64, and its right singular vectors are the covariance's eigenvectors.

Numerical zero. The float64 covariance carries rounding of about eps * lambda_max in every eigenvalue, so an exactly
rank-deficient A~ shows "singular values" near sqrt(eps) * s_max ~ 1e-8 s_max instead of 0. ``singular_values`` and
``principal_basis`` therefore set eigenvalues at or below ``rtol * lambda_max`` to 0, with ``rtol`` = d * eps by
default (the usual numerical-rank tolerance); this is s_k <= sqrt(d * eps) * s_max, about 1e-6 s_max at d = 4096, far
below anything bfloat16 activations can resolve (its resolution is 1e-2, paper footnote 4). Pass ``rtol=0`` to only
clamp negative eigenvalues.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from ranklens.errors import RanklensError
from ranklens.spectrum.accumulator import CovarianceAccumulator

__all__ = [
    "PrincipalBasis",
    "active_subspace",
    "coefficient_of_variation",
    "cumulative_variance",
    "effective_rank",
    "erank_fraction",
    "frac_sv_above",
    "principal_basis",
    "singular_values",
    "spectrum_summary",
    "stability_summary",
    "variance_decomposition",
]

_EPS64 = torch.finfo(torch.float64).eps


class PrincipalBasis(NamedTuple):
    """Eigen-decomposition of the ddof=0 covariance of an accumulator, computed once for reuse.

    eigenvalues: [d] float64, descending, >= 0 (numerical zeros set to 0, see the module docstring).
    eigenvectors: [d, d] float64, column k belongs to eigenvalue k; these are the right singular vectors V of the
        centered matrix A~ = U Sigma V^T (Section 5.2). Each column's largest-|.| entry is positive (ties: first).
    n: number of rows behind the covariance, so that s_k = sqrt(n * eigenvalues_k).
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    n: int

    @property
    def singular_values(self) -> torch.Tensor:
        """s_k = sqrt(n * lambda_k), [d] float64, descending."""
        return torch.sqrt(self.eigenvalues * self.n)


# --------------------------------------------------------------------------- inputs


def _cov_and_n(
    source: CovarianceAccumulator | torch.Tensor, n: int | None, what: str
) -> tuple[torch.Tensor, int]:
    if isinstance(source, CovarianceAccumulator):
        if n is not None and n != source.n:
            raise RanklensError(f"{what}: n={n} given with an accumulator of n={source.n}; expected n=None")
        if source.n == 0:
            raise RanklensError(f"{what}: the accumulator holds no rows (n=0); expected at least one")
        return source.covariance(ddof=0), source.n
    if isinstance(source, torch.Tensor):
        if source.ndim != 2 or source.shape[0] != source.shape[1] or source.shape[0] == 0:
            raise RanklensError(
                f"{what}: expected a square covariance [d, d], got shape {tuple(source.shape)}"
            )
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise RanklensError(f"{what}: a covariance needs its token count n (int >= 1), got n={n!r}")
        return source.detach().to(torch.float64), n
    raise RanklensError(
        f"{what}: expected a CovarianceAccumulator or a covariance tensor, got {type(source).__name__}"
    )


def _sv_vector(s: torch.Tensor | Sequence[float], what: str) -> torch.Tensor:
    t = torch.as_tensor(s).detach()
    if t.ndim != 1 or t.numel() == 0:
        raise RanklensError(
            f"{what}: expected a non-empty 1-D vector of singular values, got shape {tuple(t.shape)}"
        )
    t = t.to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise RanklensError(f"{what}: singular values contain NaN or inf; expected finite values")
    if bool((t < 0).any()):
        raise RanklensError(f"{what}: singular value {float(t.min())} < 0; expected singular values >= 0")
    return t


def _check_rtol(rtol: float | None, d: int) -> float:
    if rtol is None:
        return d * _EPS64
    if not (
        isinstance(rtol, int | float) and not isinstance(rtol, bool) and math.isfinite(rtol) and 0 <= rtol < 1
    ):
        raise RanklensError(f"rtol={rtol!r}: expected None or a number in [0, 1)")
    return float(rtol)


def _clean_eigenvalues(evals: torch.Tensor, rtol: float) -> torch.Tensor:
    """Clamp rounding negatives to 0 and zero eigenvalues at or below rtol * lambda_max."""
    evals = evals.clamp_min(0.0)
    top = evals.max() if evals.numel() else evals.new_zeros(())
    return torch.where(evals > rtol * top, evals, torch.zeros_like(evals))


def _symmetric(cov: torch.Tensor) -> torch.Tensor:
    return 0.5 * (cov + cov.T)


# --------------------------------------------------------------------------- spectrum


def singular_values(
    source: CovarianceAccumulator | torch.Tensor, n: int | None = None, *, rtol: float | None = None
) -> torch.Tensor:
    """Singular values of the mean-centered n x d matrix A~ (Section 4.1), [d] float64, descending.

    s_k = sqrt(n * lambda_k), lambda_k the eigenvalues (``torch.linalg.eigh``, float64) of the ddof=0 covariance.
    ``source`` is an accumulator, or a ddof=0 covariance [d, d] with its count ``n``. Negative eigenvalues from rounding
    become 0, and so do eigenvalues <= rtol * lambda_max (default rtol = d * eps; see the module docstring).
    """
    cov, count = _cov_and_n(source, n, "singular_values")
    tol = _check_rtol(rtol, cov.shape[0])
    evals = torch.linalg.eigvalsh(_symmetric(cov)).flip(0)
    return torch.sqrt(_clean_eigenvalues(evals, tol) * count)


def principal_basis(
    source: CovarianceAccumulator | torch.Tensor, n: int | None = None, *, rtol: float | None = None
) -> PrincipalBasis:
    """Eigenvalues (descending) and eigenvectors of the ddof=0 covariance, once, as a ``PrincipalBasis``.

    The eigenvectors are the right singular vectors V of A~ (Section 4.1, Section 5.2 / Appendix K for ASI). Sign
    convention: each column's entry of largest magnitude is made positive, so results are deterministic. (Within a
    repeated eigenvalue the basis is not unique; any orthonormal basis of that eigenspace is correct.)
    """
    cov, count = _cov_and_n(source, n, "principal_basis")
    tol = _check_rtol(rtol, cov.shape[0])
    evals, evecs = torch.linalg.eigh(_symmetric(cov))
    evals, evecs = evals.flip(0), evecs.flip(1)
    idx = evecs.abs().argmax(dim=0)
    signs = torch.sign(evecs.gather(0, idx[None, :]))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return PrincipalBasis(_clean_eigenvalues(evals, tol), (evecs * signs).contiguous(), count)


def active_subspace(source: CovarianceAccumulator | PrincipalBasis, k: int) -> torch.Tensor:
    """Top-k right singular vectors of A~ (= top-k covariance eigenvectors, descending), [d, k] float64, orthonormal.

    This is V_{d_init} of Active Subspace Initialization (Section 5.2, Appendix K), and V_n of the "fraction of loss
    recovered by the top-n components" (Section 4.1, Appendix B). Pass a ``PrincipalBasis`` to avoid recomputing.
    """
    basis = source if isinstance(source, PrincipalBasis) else principal_basis(source)
    d = basis.eigenvectors.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d:
        raise RanklensError(f"active subspace k={k!r}: expected an int with 1 <= k <= d={d}")
    return basis.eigenvectors[:, :k].clone()


def effective_rank(s: torch.Tensor | Sequence[float]) -> float:
    """Effective rank (Definition 4.1, Roy & Vetterli 2007): exp(-sum_k p_k log p_k), p = s / sum(s) over s_k > 0.

    Lies in [1, number of nonzero s]. For the zero matrix (all s = 0), which Definition 4.1 excludes, returns 0.0 (its
    rank), so a summary over a constant site does not fail.
    """
    t = _sv_vector(s, "effective_rank")
    t = t[t > 0]
    if t.numel() == 0:
        return 0.0
    p = t / t.sum()
    return float(torch.exp(-(p * torch.log(p)).sum()))


def erank_fraction(s: torch.Tensor | Sequence[float], d: int | None = None) -> float:
    """Fraction of effective rank (Section 4.1, Figure 2): effective_rank(s) / d, d = len(s) unless given."""
    t = _sv_vector(s, "erank_fraction")
    dim = t.numel() if d is None else d
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise RanklensError(f"erank_fraction d={d!r}: expected a positive int (the activation dimension)")
    return effective_rank(t) / dim


def frac_sv_above(s: torch.Tensor | Sequence[float], rel: float = 0.01) -> float:
    """Share of singular values strictly above rel * max(s) (Section 4.3: "exceed 1% of the maximum"; footnote 4).

    The denominator is all d singular values, zeros included. Returns 0.0 when all s are 0.
    """
    t = _sv_vector(s, "frac_sv_above")
    if not (isinstance(rel, int | float) and not isinstance(rel, bool) and math.isfinite(rel) and rel >= 0):
        raise RanklensError(f"frac_sv_above rel={rel!r}: expected a finite number >= 0 (0.01 for 1%)")
    top = float(t.max())
    if top == 0.0:
        return 0.0
    return float((t > rel * top).sum()) / t.numel()


def cumulative_variance(s: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """cumsum(s^2) / sum(s^2), [d] float64: variance explained by the top-k components (footnote 5: s_k^2 / n is
    the variance along singular direction k). Zeros when all s are 0."""
    t = _sv_vector(s, "cumulative_variance")
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
    cz = _symmetric(cov_z.detach().to(torch.float64))
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
