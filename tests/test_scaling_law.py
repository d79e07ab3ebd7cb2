"""The joint L(N, K) fit (Lorsa paper App. C, Gao et al. 2024's form) recovers known parameters from synthetic
losses: exactly without noise, within its stated uncertainty with noise."""

import numpy as np
import pytest

from ranklens.analysis.scaling_law import PARAMS, fit_scaling_law, predict, scaling_figure
from ranklens.errors import RanklensError

TRUE = (-0.5, 0.26, -0.017, -0.042, -1.32, -0.085)  # the magnitudes Gao et al. report for GPT-4 TopK SAEs


def _grid():
    N, K = np.meshgrid(2.0 ** np.arange(10, 17), np.array([8.0, 16, 32, 64, 128, 256]))
    return N.ravel(), K.ravel()


def test_exact_data_gives_the_parameters_back():
    N, K = _grid()
    fit = fit_scaling_law(N, K, predict(TRUE, N, K))
    np.testing.assert_allclose([fit.params[p] for p in PARAMS], TRUE, atol=1e-6)
    assert fit.rms_log_error < 1e-9


def test_noisy_data_are_recovered_within_the_stated_uncertainty():
    N, K = _grid()
    rng = np.random.default_rng(0)
    within, rms = [], []
    for _ in range(50):
        L = predict(TRUE, N, K) * np.exp(rng.normal(0, 0.01, N.shape))
        fit = fit_scaling_law(N, K, L)
        assert all(fit.stderr[p] > 0 for p in PARAMS)
        rms.append(fit.rms_log_error)
        within.append([abs(fit.params[p] - t) <= 2 * fit.stderr[p] for p, t in zip(PARAMS, TRUE, strict=True)])
    # 2 sigma holds for 95% if the standard errors are right, 68% if they were half the truth; measured over 100
    # draws: 86-94% per parameter (the linearization is slightly optimistic, as the module docstring says)
    assert np.mean(within) > 0.8
    # the residuals are the noise less what 6 fitted parameters absorb: 0.01 sqrt((42 - 6) / 42) on average
    assert np.mean(rms) == pytest.approx(0.01 * np.sqrt(36 / 42), rel=0.1)


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(RanklensError, match="more than 6"):
        fit_scaling_law([1, 2, 3], [1, 1, 1], [1, 1, 1])
    with pytest.raises(RanklensError, match="positive"):
        fit_scaling_law(*(np.arange(-1, 9.0),) * 3)
    N, K = _grid()
    fit = fit_scaling_law(N, K, predict(TRUE, N, K))
    points = [{"n": n, "k": k, "loss": loss} for n, k, loss in zip(N, K, predict(TRUE, N, K), strict=True)]
    assert scaling_figure({"Lorsa": (points, fit), "TopK SAE": (points, None)}, tmp_path / "f.png").stat().st_size > 1e4
