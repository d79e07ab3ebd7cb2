"""Spectrum statistics: effective rank (Def. 4.1), Section 4.3 metrics, active subspace, App. C CV, Section 4.4."""

from __future__ import annotations

import math

import pytest
import torch

from ranklens.errors import RanklensError
from ranklens.linalg.accumulator import CovarianceAccumulator
from ranklens.linalg.basis import (
    active_subspace,
    effective_rank,
    erank_fraction,
    principal_basis,
    singular_values,
)
from ranklens.spectrum.stats import (
    coefficient_of_variation,
    cumulative_variance,
    frac_sv_above,
    spectrum_summary,
    stability_summary,
    variance_decomposition,
)


def prescribed(n: int, s: torch.Tensor, seed: int = 0, offset: float = 3.0) -> torch.Tensor:
    """X = U diag(s) V^T + offset, U [n, d] orthonormal with columns orthogonal to the ones vector, V orthogonal."""
    d = s.numel()
    g = torch.Generator().manual_seed(seed)
    ones = torch.ones(n, 1, dtype=torch.float64) / math.sqrt(n)
    q, _ = torch.linalg.qr(torch.cat([ones, torch.randn(n, d, generator=g, dtype=torch.float64)], dim=1))
    u = q[:, 1:]  # orthonormal and orthogonal to ones: the columns of U diag(s) V^T are centered
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return u @ torch.diag(s) @ v.T + offset


# --------------------------------------------------------------------------- effective rank


def test_effective_rank_flat_spectrum():
    assert effective_rank(torch.full((37,), 2.5)) == pytest.approx(37, rel=1e-12)
    assert erank_fraction(torch.ones(37)) == pytest.approx(1.0, rel=1e-12)


def test_effective_rank_r_equal_plus_zeros():
    s = torch.cat([torch.full((5,), 3.0), torch.zeros(11)])
    assert effective_rank(s) == pytest.approx(5, rel=1e-12)
    assert erank_fraction(s) == pytest.approx(5 / 16, rel=1e-12)


def test_effective_rank_two_values_by_hand():
    # s = (3, 1): p = (3/4, 1/4); H = -(3/4 ln 3/4 + 1/4 ln 1/4)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert effective_rank([3.0, 1.0]) == pytest.approx(math.exp(h), rel=1e-14)
    assert effective_rank([3.0, 1.0]) == pytest.approx(1.7547654, rel=1e-7)
    # two values with multiplicities: 2 x 4.0 and 6 x 1.0 -> p = 4/14 (x2), 1/14 (x6)
    p = [4 / 14] * 2 + [1 / 14] * 6
    assert effective_rank([4.0, 4.0] + [1.0] * 6) == pytest.approx(
        math.exp(-sum(q * math.log(q) for q in p)), rel=1e-14
    )


def test_effective_rank_edge_cases():
    assert effective_rank(torch.zeros(4)) == 0.0
    with pytest.raises(RanklensError, match="< 0"):
        effective_rank([1.0, -0.5])
    with pytest.raises(RanklensError, match="non-empty"):
        effective_rank([])


def test_singular_values_recover_prescribed_spectrum():
    s = torch.tensor([50.0, 20.0, 10.0, 5.0, 2.0, 1.0, 0.5, 0.1, 0.05, 0.01], dtype=torch.float64)
    x = prescribed(800, s)
    acc = CovarianceAccumulator(10)
    for i in range(0, 800, 123):
        acc.update(x[i : i + 123])
    got = singular_values(acc)
    err = float(((got - s).abs() / s).max())
    print(f"prescribed spectrum max rel err {err:.3e}")
    assert err < 1e-9
    assert effective_rank(got) == pytest.approx(effective_rank(s), rel=1e-10)
    # the covariance + count form gives the same
    torch.testing.assert_close(singular_values(acc.covariance(), acc.n), got, rtol=1e-12, atol=0)


def test_exactly_low_rank_data_gives_zeros():
    s = torch.cat([torch.full((4,), 2.0, dtype=torch.float64), torch.zeros(12, dtype=torch.float64)])
    acc = CovarianceAccumulator(16).update(prescribed(300, s, seed=2, offset=100.0))
    got = singular_values(acc)
    assert int((got > 0).sum()) == 4
    assert effective_rank(got) == pytest.approx(4, rel=1e-10)
    assert bool((singular_values(acc, rtol=0) >= 0).all())


# --------------------------------------------------------------------------- Section 4.3 metrics


def test_frac_sv_above_and_cumulative_variance():
    s = torch.tensor([100.0, 50.0, 1.0, 1.0 + 1e-9, 0.5, 0.0], dtype=torch.float64)
    assert frac_sv_above(s) == pytest.approx(3 / 6)  # strictly above 1.0 = 1% of 100: 100, 50, 1+1e-9
    assert frac_sv_above(s, rel=0.6) == pytest.approx(1 / 6)
    assert frac_sv_above(torch.zeros(3)) == 0.0
    cv = cumulative_variance([3.0, 2.0, 1.0, 0.0])
    torch.testing.assert_close(cv, torch.tensor([9 / 14, 13 / 14, 1.0, 1.0], dtype=torch.float64))
    assert cv.dtype == torch.float64


def test_spectrum_summary_keys():
    s = torch.tensor([4.0, 2.0, 1.0, 0.001], dtype=torch.float64)
    acc = CovarianceAccumulator(4).update(prescribed(50, s))
    out = spectrum_summary(acc)
    assert set(out) == {
        "d",
        "n_tokens",
        "effective_rank",
        "erank_fraction",
        "frac_sv_above_1pct",
        "singular_values",
        "cumulative_variance",
        "n_excluded",
    }
    assert out["d"] == 4 and out["n_tokens"] == 50 and out["n_excluded"] == 0
    assert out["frac_sv_above_1pct"] == pytest.approx(0.75)
    assert out["effective_rank"] == pytest.approx(effective_rank(s), rel=1e-9)
    assert out["erank_fraction"] == pytest.approx(out["effective_rank"] / 4)
    assert out["singular_values"] == pytest.approx(s.tolist(), rel=1e-7)  # cond 4000 in the covariance
    assert out["cumulative_variance"][-1] == pytest.approx(1.0)
    import json

    json.dumps(out)


# --------------------------------------------------------------------------- active subspace


def test_active_subspace_matches_svd():
    g = torch.Generator().manual_seed(4)
    d = 24
    x = torch.randn(2000, 6, generator=g, dtype=torch.float64) @ torch.randn(
        6, d, generator=g, dtype=torch.float64
    )
    x = (
        x * torch.linspace(1.0, 3.0, d, dtype=torch.float64)
        + 0.05 * torch.randn(2000, d, generator=g, dtype=torch.float64)
        + 7.0
    )
    acc = CovarianceAccumulator(d).update(x)
    _, _, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    basis = principal_basis(acc)
    for k in (1, 3, 6, 10, d):
        v = active_subspace(basis, k)
        assert v.shape == (d, k) and v.dtype == torch.float64
        torch.testing.assert_close(v.T @ v, torch.eye(k, dtype=torch.float64), atol=1e-12, rtol=0)
        ref = vh[:k].T
        diff = float((v @ v.T - ref @ ref.T).abs().max())
        assert diff < 1e-8, (k, diff)
    # from the accumulator directly, same result; sign convention: largest-|.| entry positive
    v6 = active_subspace(acc, 6)
    torch.testing.assert_close(v6, active_subspace(basis, 6))
    idx = v6.abs().argmax(dim=0)
    assert bool((v6.gather(0, idx[None]) > 0).all())
    # eigh vs eigvalsh
    torch.testing.assert_close(basis.singular_values, singular_values(acc), rtol=1e-10, atol=0)
    for bad in (0, d + 1, 2.0):
        with pytest.raises(RanklensError, match="1 <= k <= d=24"):
            active_subspace(basis, bad)


# --------------------------------------------------------------------------- Appendix C


def test_coefficient_of_variation_known_values():
    vals = torch.tensor([[2.0, 10.0], [4.0, 10.0], [6.0, 10.0]])
    cv = coefficient_of_variation(vals)
    # column 0: mean 4, population std sqrt(8/3)
    torch.testing.assert_close(cv, torch.tensor([math.sqrt(8 / 3) / 4, 0.0], dtype=torch.float64))
    torch.testing.assert_close(
        coefficient_of_variation(vals, ddof=1)[0], torch.tensor(2.0 / 4, dtype=torch.float64)
    )
    assert coefficient_of_variation([1.0, 3.0]).item() == pytest.approx(0.5)


def test_stability_summary():
    g = torch.Generator().manual_seed(9)
    mix = torch.randn(32, 32, generator=g, dtype=torch.float64)
    splits = [torch.randn(n, 32, generator=g, dtype=torch.float64) @ mix for n in (3000, 3000, 3000, 4000)]
    accs = [CovarianceAccumulator(32).update(x) for x in splits]
    out = stability_summary(accs)
    eranks = [effective_rank(singular_values(a)) for a in accs]
    assert out["effective_ranks"] == pytest.approx(eranks)
    m = sum(eranks) / 4
    sd = math.sqrt(sum((e - m) ** 2 for e in eranks) / 4)
    assert out["erank_mean"] == pytest.approx(m) and out["erank_std"] == pytest.approx(sd)
    assert out["erank_cv"] == pytest.approx(sd / m)
    assert 0 < out["sv_cv_mean"] <= out["sv_cv_max"] < 0.2
    assert out["n_sv_compared"] == 32 and out["n_tokens"] == [3000, 3000, 3000, 4000]
    # identical splits: CV 0
    same = stability_summary([accs[0], accs[0].copy()])
    assert same["sv_cv_max"] == 0.0 and same["erank_cv"] == 0.0
    with pytest.raises(RanklensError, match="at least 2"):
        stability_summary(accs[:1])


# --------------------------------------------------------------------------- Section 4.4


def test_variance_decomposition_identity_and_real_output_variance():
    g = torch.Generator().manual_seed(11)
    n, dz, d_model = 4000, 12, 16
    z = (
        torch.randn(n, dz, generator=g, dtype=torch.float64)
        @ torch.randn(dz, dz, generator=g, dtype=torch.float64)
        + 2.0
    )
    linear = torch.nn.Linear(dz, d_model, bias=False).double()
    with torch.no_grad():
        linear.weight.copy_(torch.randn(d_model, dz, generator=g, dtype=torch.float64))
    W_O = linear.weight.detach()  # [d_model, dz], nn.Linear layout
    with torch.no_grad():
        o = linear(z)  # O = Z W_O^T, [n, d_model]
    acc_z = CovarianceAccumulator(dz).update(z)
    acc_o = CovarianceAccumulator(d_model).update(o)
    basis = principal_basis(acc_o)
    e = basis.eigenvectors  # [d_model, d_model], directions of the O spectrum
    out = variance_decomposition(acc_z.covariance(), W_O, e)
    torch.testing.assert_close(out["contrib_Z"] * out["contrib_WO"], out["var_O"], rtol=1e-12, atol=1e-12)
    cov_o = acc_o.covariance()
    ref = torch.einsum("im,ij,jm->m", e, cov_o, e)  # e^T cov_O e from the actual samples of O
    torch.testing.assert_close(out["var_O"], ref, rtol=1e-9, atol=1e-9)
    # along the O eigenvectors, var_O are the eigenvalues, i.e. s_k^2 / n (footnote 5)
    torch.testing.assert_close(out["var_O"][:dz], basis.eigenvalues[:dz], rtol=1e-8, atol=1e-9)
    # d_model > dz: W_O has a null space on the output side; those directions have v = 0
    assert bool((out["var_O"][dz:].abs() < 1e-8).all())
    # accumulator form of cov_z gives the same
    torch.testing.assert_close(variance_decomposition(acc_z, W_O, e)["var_O"], out["var_O"])


def test_variance_decomposition_zero_v_and_bad_input():
    W_O = torch.zeros(3, 2)
    W_O[0, 0] = 2.0
    e = torch.eye(3)
    out = variance_decomposition(torch.eye(2) * 5.0, W_O, e)
    torch.testing.assert_close(out["contrib_WO"], torch.tensor([4.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(out["contrib_Z"], torch.tensor([5.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(out["var_O"], torch.tensor([20.0, 0.0, 0.0], dtype=torch.float64))
    with pytest.raises(RanklensError, match="nn.Linear layout"):
        variance_decomposition(torch.eye(2), torch.zeros(2, 3), e)
    with pytest.raises(RanklensError, match="unit vectors"):
        variance_decomposition(torch.eye(2), W_O, 2 * e)
    with pytest.raises(RanklensError, match="d_model=3"):
        variance_decomposition(torch.eye(2), W_O, torch.eye(4))
