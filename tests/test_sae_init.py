"""SAE initializers: decoder-norm grid search (paper App. E.3), ASI (Section 5.2, App. K), random subspace (App. J.1),
the d_init rule (App. J.3, I.1) and the PCA fold (App. L.1)."""

import copy
import json
from pathlib import Path

import pytest
import torch

from ranklens.dictionaries.init import (
    AUTO_D_INIT_VARIANCE,
    PCAProjection,
    asi_basis,
    default_norm_grid,
    init_asi_,
    init_random_subspace_,
    init_standard_,
    pca_fold,
    random_subspace,
    resolve_d_init,
)
from ranklens.dictionaries.sae import SparseAutoencoder
from ranklens.errors import RanklensError
from ranklens.linalg.accumulator import CovarianceAccumulator
from ranklens.linalg.basis import active_subspace, directions_for_variance

D, N_FEAT = 16, 64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _low_rank_sample(n=300, d=D, rank=5, seed=0):
    """Activations with a dominant rank-`rank` part, a small full-rank part and a nonzero mean."""
    g = _gen(seed)
    basis = torch.linalg.qr(torch.randn(d, rank, generator=g, dtype=torch.float64))[0]
    coef = torch.randn(n, rank, generator=g, dtype=torch.float64) * torch.linspace(3, 1, rank, dtype=torch.float64)
    noise = 0.05 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return coef @ basis.T + noise + 0.5


def _sae(**kw):
    fields = dict(d_in=D, n_features=N_FEAT, k=4, dtype="float64")
    fields.update(kw)
    return SparseAutoencoder(**fields)


def _mse(sae, x):
    with torch.no_grad():
        x_hat, _ = sae(x)
    return float(((x - x_hat) ** 2).sum(1).mean())


def _brute_force(sae, unit, x, grid, tied=True):
    out = []
    for r in grid:
        probe = copy.deepcopy(sae)
        with torch.no_grad():
            probe.W_E.copy_(unit * r)
            probe.W_D.copy_(unit * r if tied else unit)
        out.append(_mse(probe, x))
    return out


# --------------------------------------------------------------------------- standard init (App. E.3)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),  # topk: MSE from the homogeneous shortcut
        dict(activation="relu", k=None),
        dict(activation="batchtopk", k=4),
        dict(activation="jumprelu", k=None, jumprelu_init_threshold=0.3),  # brute force inside init_standard_
    ],
)
def test_norm_grid_search_picks_brute_force_minimum(kw):
    x = _low_rank_sample()
    sae = _sae(**kw)
    grid = [0.05 * 1.5**i for i in range(20)]
    res = init_standard_(sae, x, norms=grid, generator=_gen(0))
    norms = sae.W_D.detach().norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, res.norm))
    unit = sae.W_D.detach() / res.norm
    brute = _brute_force(sae, unit, x, grid)
    torch.testing.assert_close(torch.tensor(res.mse), torch.tensor(brute), rtol=1e-9, atol=1e-9)
    assert res.norm == grid[min(range(len(grid)), key=brute.__getitem__)]
    assert res.mse[grid.index(res.norm)] == min(res.mse)
    assert _mse(sae, x) == pytest.approx(min(brute), rel=1e-9)


def test_standard_init_ties_encoder_to_decoder_zero_biases_and_determinism():
    x = _low_rank_sample()
    a, b, c = _sae(), _sae(), _sae()
    with torch.no_grad():
        a.b_E.fill_(1.0)
        a.b_D.fill_(1.0)
    ra = init_standard_(a, x, generator=_gen(5))
    init_standard_(b, x, generator=_gen(5))
    init_standard_(c, x, generator=_gen(6))
    assert torch.equal(a.W_E, a.W_D)
    assert not a.b_E.any() and not a.b_D.any()
    assert torch.equal(a.W_D, b.W_D) and torch.equal(a.W_E, b.W_E)
    assert not torch.equal(a.W_D, c.W_D)
    # The default grid: 21 values, 0.1x..10x around the least-squares norm, which topk's quadratic MSE picks.
    assert len(ra.norms) == 21
    assert ra.norm == pytest.approx(ra.center, rel=1e-12)
    assert ra.norms[0] == pytest.approx(ra.center / 10) and ra.norms[-1] == pytest.approx(ra.center * 10)
    rows = a.W_D.detach() / a.W_D.detach().norm(dim=1, keepdim=True)
    assert float(rows.abs().max()) <= 1.0  # came from U(-1, 1) before scaling


def test_standard_init_with_unit_decoder_searches_the_encoder_norm():
    x = _low_rank_sample()
    sae = _sae(normalize_decoder=True)
    grid = [0.5 * 1.4**i for i in range(20)]
    res = init_standard_(sae, x, norms=grid, generator=_gen(1))
    torch.testing.assert_close(sae.W_D.detach().norm(dim=1), torch.ones(N_FEAT, dtype=torch.float64))
    torch.testing.assert_close(sae.W_E.detach(), res.norm * sae.W_D.detach())
    brute = _brute_force(sae, sae.W_D.detach().clone(), x, grid, tied=False)
    torch.testing.assert_close(torch.tensor(res.mse), torch.tensor(brute), rtol=1e-9, atol=1e-9)


def test_standard_init_errors():
    sae = _sae()
    with pytest.raises(RanklensError, match=r"x_sample has shape \(5, 3\)"):
        init_standard_(sae, torch.zeros(5, 3, dtype=torch.float64))
    with pytest.raises(RanklensError, match="norm -1"):
        init_standard_(sae, _low_rank_sample(), norms=[1.0, -1.0])
    with pytest.raises(RanklensError, match="center"):
        default_norm_grid(0.0)


# --------------------------------------------------------------------------- ASI (Section 5.2, App. K)


def _acc(x):
    return CovarianceAccumulator(x.shape[1]).update(x)


def test_asi_projects_decoder_rows_onto_the_active_subspace():
    x = _low_rank_sample()
    sae = _sae()
    init_standard_(sae, x, generator=_gen(0))
    w_std = sae.W_D.detach().clone()
    V = asi_basis(_acc(x), 5)
    res = init_asi_(sae, V)
    assert res.norm_search is None and torch.equal(res.basis, V)
    W = sae.W_D.detach()
    torch.testing.assert_close(W, w_std @ V @ V.T, rtol=1e-12, atol=1e-12)  # exactly W_D V V^T
    assert float((W - W @ V @ V.T).abs().max()) < 1e-12  # rows lie in span(V)
    assert torch.equal(sae.W_E, sae.W_D)  # W_E = W_D^T in the paper's convention
    assert not sae.b_E.any() and not sae.b_D.any()


def test_asi_with_full_dimension_changes_nothing():
    x = _low_rank_sample()
    std, asi = _sae(), _sae()
    init_standard_(std, x, generator=_gen(2))
    init_standard_(asi, x, generator=_gen(2))
    init_asi_(asi, asi_basis(_acc(x), D))  # footnote 7: d_init = d is no ASI
    torch.testing.assert_close(asi.W_D, std.W_D, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(asi.W_E, std.W_E, rtol=1e-12, atol=1e-12)


def test_asi_with_norm_research_and_with_unit_decoder():
    x = _low_rank_sample()
    V = asi_basis(_acc(x), 4)
    sae = _sae()
    init_standard_(sae, x, generator=_gen(3))
    before = _mse(sae, x)
    res = init_asi_(sae, V, x_sample=x)
    W = sae.W_D.detach()
    norms = W.norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, res.norm_search.norm))  # one common norm again
    assert float((W - W @ V @ V.T).abs().max()) < 1e-12
    assert torch.equal(sae.W_E, sae.W_D)
    assert _mse(sae, x) == pytest.approx(min(res.norm_search.mse), rel=1e-9)
    assert _mse(sae, x) < before  # in the active subspace the initial reconstruction is better

    unit = _sae(normalize_decoder=True)
    r = init_standard_(unit, x, generator=_gen(3)).norm
    init_asi_(unit, V)
    Wu = unit.W_D.detach()
    torch.testing.assert_close(Wu.norm(dim=1), torch.ones(N_FEAT, dtype=torch.float64))
    assert float((Wu - Wu @ V @ V.T).abs().max()) < 1e-12
    torch.testing.assert_close(unit.W_E.detach(), r * Wu)


def test_asi_basis_errors():
    sae = _sae()
    with pytest.raises(RanklensError, match=r"basis has shape \(15, 3\)"):
        init_asi_(sae, torch.zeros(15, 3, dtype=torch.float64))
    with pytest.raises(RanklensError, match="not orthonormal"):
        init_asi_(sae, torch.ones(D, 2, dtype=torch.float64))
    with pytest.raises(RanklensError, match="without x_sample"):
        init_asi_(sae, torch.eye(D, 2, dtype=torch.float64), norms=[1.0])
    # a basis rounded to bfloat16 is accepted (and used in float64)
    V = random_subspace(D, 4, _gen(0)).bfloat16()
    res = init_asi_(sae, V)
    assert res.basis.dtype == torch.float64 and torch.equal(res.basis, V.double())


def test_random_subspace_init():
    x = _low_rank_sample()
    sae = _sae()
    init_standard_(sae, x, generator=_gen(0))
    res = init_random_subspace_(sae, D, 5, _gen(9))
    V = res.basis
    torch.testing.assert_close(V.T @ V, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-12)
    W = sae.W_D.detach()
    assert float((W - W @ V @ V.T).abs().max()) < 1e-12
    assert torch.equal(sae.W_E, sae.W_D)
    assert torch.equal(random_subspace(D, 5, _gen(9)), V)
    assert not torch.equal(random_subspace(D, 5, _gen(10)), V)
    with pytest.raises(RanklensError, match="d_in=17"):
        init_random_subspace_(sae, 17, 5, _gen(9))
    with pytest.raises(RanklensError, match="d_init=0"):
        init_random_subspace_(sae, D, 0, _gen(9))


# --------------------------------------------------------------------------- d_init


def test_directions_for_variance_equals_a_naive_count():
    # s^2 = 90, 9, 0.9, 0.1 (total 100): up to 90% needs 1 direction, up to 99% 2, up to 99.9% 3, beyond 4
    s = torch.tensor([90.0, 9.0, 0.9, 0.1], dtype=torch.float64).sqrt()
    assert [directions_for_variance(s, v) for v in (0.5, 0.89, 0.95, 0.98, 0.995, 0.998, 0.9995)] == [1, 1, 2, 2, 3, 3, 4]
    assert directions_for_variance(torch.zeros(5), 0.99) == 1
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        s = torch.rand(50, generator=g, dtype=torch.float64).sort(descending=True).values ** 3
        level = float(torch.rand(1, generator=g))
        share, n = 0.0, 0
        while share < level * float((s**2).sum()):  # the first n whose top-n variance reaches the level
            share += float(s[n] ** 2)
            n += 1
        assert directions_for_variance(s, level) == max(n, 1)


def test_auto_d_init_gives_the_documented_values_on_the_evidence_spectra():
    # docs/results/d_init_rule.md and resolve_d_init's docstring: 276, 310 and 186 directions hold 99% of the variance
    spectra = json.loads((Path(__file__).parent / "data" / "d_init_spectra.json").read_text())["singular_values"]
    documented = {"smollm2-135m/L15.attn_out": 276, "smollm2-135m/L3.attn_out": 310, "minilm-l6/L3.attn_out": 186}
    assert AUTO_D_INIT_VARIANCE == 0.99
    for key, d_init in documented.items():
        assert resolve_d_init("auto", torch.tensor(spectra[key])) == d_init, key


def test_resolve_d_init_rules():
    flat = torch.ones(100, dtype=torch.float64)  # every direction holds 1%: 99 of them reach 99%
    assert resolve_d_init("auto", flat) == 99
    assert resolve_d_init("auto", torch.tensor([1.0, 0.0, 0.0])) == 1  # one direction holds everything
    assert resolve_d_init("auto", torch.zeros(3)) == 1  # clamped to >= 1
    assert resolve_d_init(768, d=4096) == 768
    assert resolve_d_init(100, flat) == 100
    x = _low_rank_sample()
    acc = _acc(x)
    assert resolve_d_init("auto", acc) == resolve_d_init("auto", torch.linalg.svdvals(x - x.mean(0)))
    V = asi_basis(acc)
    assert V.shape == (D, resolve_d_init("auto", acc))
    torch.testing.assert_close(V, active_subspace(acc, V.shape[1]))


@pytest.mark.parametrize(
    "spec,kw,match",
    [
        (0, dict(d=8), "d_init=0"),
        (9, dict(d=8), "d_init=9; expected 1 <= d_init <= d=8"),
        ("half", dict(d=8), "d_init='half'"),
        (True, dict(d=8), "d_init=True"),
        (2.5, dict(d=8), "d_init=2.5"),
        ("auto", dict(d=8), "needs the spectrum"),
        (3, dict(), "without d"),
        (3, dict(source=torch.ones(4), d=8), "4 singular values but d=8"),
    ],
)
def test_resolve_d_init_errors(spec, kw, match):
    with pytest.raises(RanklensError, match=match):
        resolve_d_init(spec, **kw)


# --------------------------------------------------------------------------- PCA fold (App. L.1)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(apply_b_dec_to_input=True),
        dict(activation="relu", k=None),
        dict(activation="jumprelu", k=None),
    ],
)
def test_pca_fold_is_exact(kw):
    x = _low_rank_sample(n=200)
    acc = _acc(x)
    proj = PCAProjection.from_accumulator(acc, 6)
    small = SparseAutoencoder(d_in=6, n_features=N_FEAT, dtype="float64", **{"k": 4, **kw})
    g = _gen(11)
    with torch.no_grad():
        for p in small.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
        if small.log_threshold is not None:
            small.log_threshold.copy_(torch.full((N_FEAT,), -1.5, dtype=torch.float64))
    big = proj.fold_into(small)
    assert big.d_in == D and big.config.activation == small.config.activation
    y = proj.project(x)
    torch.testing.assert_close(y, (x - acc.mean) @ active_subspace(acc, 6))
    y_hat, code_s = small(y)
    x_hat, code_b = big(x)
    torch.testing.assert_close(code_b.to_dense(), code_s.to_dense(), rtol=1e-10, atol=1e-10)
    if code_s.is_sparse:
        assert torch.equal(code_b.indices, code_s.indices)
    torch.testing.assert_close(x_hat, proj.unproject(y_hat), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(big.W_D.norm(dim=1), small.W_D.norm(dim=1))
    same = pca_fold(small, proj.basis, proj.mean)
    assert torch.equal(same.W_E, big.W_E) and torch.equal(same.b_D, big.b_D)


def test_pca_projection_errors():
    proj = PCAProjection(torch.zeros(D, dtype=torch.float64), torch.eye(D, 3, dtype=torch.float64))
    with pytest.raises(RanklensError, match="expected d_pca=3"):
        proj.fold_into(_sae())
    with pytest.raises(RanklensError, match=r"expected \[..., d=16\]"):
        proj.project(torch.zeros(2, 5))
    with pytest.raises(RanklensError, match="mean has shape"):
        PCAProjection(torch.zeros(2, D), torch.eye(D, 3))


def test_standard_init_with_a_decoder_bias_start_fits_the_rest():
    """b_dec starts b_D there; the norm search then minimizes the MSE of the whole SAE (brute force over the grid)."""
    x = _low_rank_sample() + 3.0  # a large mean, as attention outputs have
    mean = x.mean(0)
    grid = [0.05 * 1.5**i for i in range(20)]
    sae = _sae()
    res = init_standard_(sae, x, norms=grid, generator=_gen(0), b_dec=mean)
    assert torch.equal(sae.b_D.detach(), mean.to(sae.b_D.dtype)) and not sae.b_E.any()
    unit = sae.W_D.detach() / res.norm
    brute = []
    for r in grid:
        probe = copy.deepcopy(sae)
        with torch.no_grad():
            probe.W_E.copy_(unit * r)
            probe.W_D.copy_(unit * r)
        brute.append(_mse(probe, x))
    torch.testing.assert_close(torch.tensor(res.mse), torch.tensor(brute), rtol=1e-9, atol=1e-9)
    assert _mse(sae, x) == pytest.approx(min(brute), rel=1e-9)
    assert _mse(sae, x) < _mse(_zero_bias_copy(x), x)


def _zero_bias_copy(x):
    sae = _sae()
    init_standard_(sae, x, generator=_gen(0))
    return sae
