"""The covariance floor of ranklens: singular values, principal basis, active subspace and effective rank of the
mean-centered activations behind a ``CovarianceAccumulator`` (paper Section 4.1, Definition 4.1; Section 5.2).

The n x d matrix A~ of mean-centered activations is never built: its singular values are s_k = sqrt(n * lambda_k),
lambda_k the eigenvalues of the ddof=0 covariance, computed with ``torch.linalg.eigh`` in float64, and its right
singular vectors are the covariance's eigenvectors.

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
from typing import NamedTuple

import torch

from ranklens.errors import RanklensError
from ranklens.linalg.accumulator import CovarianceAccumulator

__all__ = ["PrincipalBasis", "active_subspace", "directions_for_variance", "effective_rank", "erank_fraction",
           "principal_basis", "singular_values"]

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


def checked_singular_values(s: torch.Tensor | Sequence[float], what: str) -> torch.Tensor:
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


def symmetrize(cov: torch.Tensor) -> torch.Tensor:
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
    evals = torch.linalg.eigvalsh(symmetrize(cov)).flip(0)
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
    evals, evecs = torch.linalg.eigh(symmetrize(cov))
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
    t = checked_singular_values(s, "effective_rank")
    t = t[t > 0]
    if t.numel() == 0:
        return 0.0
    p = t / t.sum()
    return float(torch.exp(-(p * torch.log(p)).sum()))


def erank_fraction(s: torch.Tensor | Sequence[float], d: int | None = None) -> float:
    """Fraction of effective rank (Section 4.1, Figure 2): effective_rank(s) / d, d = len(s) unless given."""
    t = checked_singular_values(s, "erank_fraction")
    dim = t.numel() if d is None else d
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise RanklensError(f"erank_fraction d={d!r}: expected a positive int (the activation dimension)")
    return effective_rank(t) / dim


def directions_for_variance(s: torch.Tensor, level: float) -> int:
    """The smallest n whose top-n principal directions hold ``level`` of the variance: the first n with
    sum_{i<n} s_i^2 >= level * sum_i s_i^2 (singular values s in descending order, as ``principal_basis`` gives
    them); 1 for an all-zero spectrum."""
    variance = torch.as_tensor(s, dtype=torch.float64) ** 2
    total = float(variance.sum())
    if total == 0.0:
        return 1
    kept = torch.cumsum(variance, 0)
    return int((kept < level * total).sum()) + 1
