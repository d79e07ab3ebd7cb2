"""The joint L(N, K) scaling law (Lorsa paper App. C, Figure 9), in the functional form of Gao et al. 2024 ("Scaling
and evaluating sparse autoencoders", Section 3.5, joint scaling law of TopK autoencoders):

    L(N, K) = exp(alpha + beta_k log K + beta_n log N + gamma log K log N) + exp(zeta + eta log K)

with N the dictionary size (SAE features or Lorsa heads) and K the number active per token: a power law in N whose
exponent moves with K, plus an irreducible term that depends on K only.

The fit minimizes the squared error of log L (a relative error, as the losses span orders of magnitude) with scipy's
trust-region least squares from several starts; the standard errors are those of the linearized model at the
optimum: cov = s^2 (J^T J)^-1 with s^2 = RSS / (n - 6) and J the Jacobian of the residuals. They are slightly
optimistic: on synthetic data with Gao et al.'s parameters, 42 points (N = 2^10..2^16, K = 8..256) and 1% noise,
the 2-sigma intervals held the true value in 86-94% of 100 draws per parameter (95% nominal; tests/test_scaling_law.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from scipy.optimize import least_squares

from ranklens.errors import RanklensError
from ranklens.report.plots import save_figure

__all__ = ["PARAMS", "ScalingFit", "fit_scaling_law", "predict", "scaling_figure"]

PARAMS = ("alpha", "beta_k", "beta_n", "gamma", "zeta", "eta")


def predict(params: Sequence[float], N: np.ndarray, K: np.ndarray) -> np.ndarray:
    alpha, beta_k, beta_n, gamma, zeta, eta = params
    lk, ln = np.log(np.asarray(K, dtype=float)), np.log(np.asarray(N, dtype=float))
    return np.exp(alpha + beta_k * lk + beta_n * ln + gamma * lk * ln) + np.exp(zeta + eta * lk)


@dataclass
class ScalingFit:
    params: dict[str, float]
    stderr: dict[str, float]
    rms_log_error: float  # root mean square of log(L_fit / L) over the points
    n_points: int

    def to_dict(self) -> dict:
        return {"form": "L(N, K) = exp(alpha + beta_k log K + beta_n log N + gamma log K log N) + exp(zeta + eta log K)",
                "params": self.params, "stderr": self.stderr, "rms_log_error": self.rms_log_error,
                "n_points": self.n_points}


def _starts(N: np.ndarray, K: np.ndarray, L: np.ndarray) -> list[np.ndarray]:
    """Starting points: the first term from a linear fit of log L, the second a fraction of the smallest loss."""
    lk, ln = np.log(K), np.log(N)
    X = np.stack([np.ones_like(lk), lk, ln, lk * ln], 1)
    linear = np.linalg.lstsq(X, np.log(L), rcond=None)[0]
    floor = np.log(L.min())
    return [np.concatenate([linear, [floor + shift, 0.0]]) for shift in (-4.0, -2.0, -1.0)]


def fit_scaling_law(N: Sequence[float], K: Sequence[float], L: Sequence[float]) -> ScalingFit:
    """Fit the joint law to losses L at sizes N and sparsities K (see the module docstring)."""
    N, K, L = (np.asarray(v, dtype=float) for v in (N, K, L))
    if not (N.shape == K.shape == L.shape) or N.ndim != 1:
        raise RanklensError("fit_scaling_law: N, K and L must be 1-D and of one length")
    if len(L) <= len(PARAMS):
        raise RanklensError(f"fit_scaling_law: {len(L)} points; expected more than {len(PARAMS)} (the parameters)")
    if (N <= 0).any() or (K <= 0).any() or (L <= 0).any():
        raise RanklensError("fit_scaling_law: N, K and L must be positive")
    if len(np.unique(N)) < 3 or len(np.unique(K)) < 2:
        raise RanklensError("fit_scaling_law: need at least 3 distinct N and 2 distinct K")

    def residuals(p: np.ndarray) -> np.ndarray:
        return np.log(predict(p, N, K)) - np.log(L)

    best = None
    for start in _starts(N, K, L):
        result = least_squares(residuals, start, method="trf", x_scale="jac", xtol=1e-15, ftol=1e-15, gtol=1e-15,
                               max_nfev=20_000)
        if best is None or result.cost < best.cost:
            best = result
    dof = len(L) - len(PARAMS)
    s2 = 2 * best.cost / dof
    cov = s2 * np.linalg.pinv(best.jac.T @ best.jac)
    stderr = np.sqrt(np.clip(np.diag(cov), 0, None))
    return ScalingFit(dict(zip(PARAMS, map(float, best.x), strict=True)),
                      dict(zip(PARAMS, map(float, stderr), strict=True)),
                      float(np.sqrt(np.mean(best.fun ** 2))), len(L))


def scaling_figure(series: Mapping[str, tuple[Sequence[Mapping], ScalingFit | None]], path: str | Path,
                   xlabel: str = "N (heads or features)") -> Path:
    """Figure 9: one panel per model part (e.g. "Lorsa", "TopK SAE"), loss against N on log axes, one colour per K,
    the points and the fitted law. series[name] = (points with keys n, k, loss; its fit or None)."""
    if not series:
        raise RanklensError("scaling_figure: nothing to draw")
    fig = Figure(figsize=(4.2 * len(series), 3.6))
    for i, (name, (points, fit)) in enumerate(series.items()):
        ax = fig.add_subplot(1, len(series), i + 1)
        ks = sorted({p["k"] for p in points})
        colors = [f"C{j % 10}" for j in range(len(ks))]
        for k, color in zip(ks, colors, strict=True):
            pts = sorted((p["n"], p["loss"]) for p in points if p["k"] == k)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", color=color, label=f"K = {k}")
            if fit is not None:
                grid = np.geomspace(pts[0][0], pts[-1][0], 50)
                ax.plot(grid, predict(list(fit.params.values()), grid, np.full_like(grid, k)), "-", color=color)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss at convergence (FVU)")
        ax.set_title(name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)
