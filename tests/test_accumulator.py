"""CovarianceAccumulator and NormStats against dense references (full centered matrix, two-pass statistics)."""

from __future__ import annotations

import pytest
import torch

from ranklens.errors import RanklensError
from ranklens.linalg.accumulator import CovarianceAccumulator, NormStats, symmetric_gram
from ranklens.linalg.basis import singular_values


def low_rank_data(
    n: int = 5000, d: int = 64, rank: int = 10, noise: float = 1e-2, seed: int = 0
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, rank, generator=g, dtype=torch.float64) @ torch.randn(
        rank, d, generator=g, dtype=torch.float64
    )
    return a + noise * torch.randn(n, d, generator=g, dtype=torch.float64)


def uneven_batches(x: torch.Tensor, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out, i = [], 0
    while i < x.shape[0]:
        b = int(torch.randint(1, 700, (1,), generator=g))
        out.append(x[i : i + b])
        i += b
    return out


def feed(x: torch.Tensor, **kwargs) -> CovarianceAccumulator:
    acc = CovarianceAccumulator(x.shape[-1], **kwargs)
    for batch in uneven_batches(x):
        acc.update(batch)
    return acc


def dense_sv(x: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.float64)
    return torch.linalg.svdvals(x - x.mean(0))


def max_rel_err(s: torch.Tensor, ref: torch.Tensor, rel: float = 1e-3) -> float:
    keep = ref > rel * ref[0]
    return float(((s[keep] - ref[keep]).abs() / ref[keep]).max())


def test_singular_values_match_dense_svd():
    x = low_rank_data()
    err = max_rel_err(singular_values(feed(x)), dense_sv(x))
    print(f"float64 max rel err {err:.3e}")
    assert err < 1e-6


def test_large_mean_matches_dense_svd():
    x = low_rank_data() + 1e4
    acc = feed(x)
    err = max_rel_err(singular_values(acc), dense_sv(x))
    print(f"mean 1e4 max rel err {err:.3e}")
    assert err < 1e-6
    xc = x - x.mean(0)
    torch.testing.assert_close(acc.mean, x.mean(0), rtol=1e-14, atol=0)
    torch.testing.assert_close(acc.covariance(), xc.T @ xc / x.shape[0], rtol=1e-9, atol=1e-12)


def test_huge_mean_unit_std_covariance():
    """Mean 1e4, std 1 in every coordinate: the covariance matches the two-pass result."""
    g = torch.Generator().manual_seed(3)
    x = 1e4 + torch.randn(4000, 16, generator=g, dtype=torch.float64)
    acc = feed(x)
    xc = x - x.mean(0)
    ref = xc.T @ xc / x.shape[0]
    assert float((acc.covariance() - ref).abs().max()) < 1e-10
    torch.testing.assert_close(acc.covariance(ddof=1), xc.T @ xc / (x.shape[0] - 1), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_low_precision_inputs(dtype, offset):
    x = (low_rank_data() + offset).to(dtype)
    err = max_rel_err(singular_values(feed(x)), dense_sv(x))  # reference: svd of the same data upcast
    print(f"{dtype} offset {offset} max rel err {err:.3e}")
    assert err < 1e-6


def test_chunking_bounds_memory_and_is_exact():
    x = low_rank_data(n=1000, d=32)
    one = CovarianceAccumulator(32).update(x)
    tiny = CovarianceAccumulator(32, chunk_bytes=8 * 32 * 7).update(x)  # 7-row chunks
    torch.testing.assert_close(tiny.scatter, one.scatter, rtol=1e-12, atol=1e-9)
    assert tiny.n == one.n == 1000


def test_leading_dims_are_flattened():
    x = low_rank_data(n=600, d=8).reshape(20, 30, 8)
    a = CovarianceAccumulator(8).update(x)
    b = CovarianceAccumulator(8).update(x.reshape(-1, 8))
    torch.testing.assert_close(a.scatter, b.scatter)


@pytest.mark.parametrize("sizes", [(1, 4999), (2500, 2500), (37, 4000, 963)])
def test_merge_equals_one_pass(sizes):
    x = low_rank_data()
    # different reference means: shift each part differently, then undo in the reference
    parts, i = [], 0
    for k, m in enumerate(sizes):
        parts.append(x[i : i + m] + (1e3 * k))
        i += m
    full = torch.cat(parts)
    one = feed(full)
    accs = [feed(p) for p in parts]
    merged = accs[0].merge(accs[1])
    for a in accs[2:]:
        merged = merged.merge(a)
    assert merged.n == one.n == full.shape[0]
    torch.testing.assert_close(merged.mean, one.mean, rtol=1e-13, atol=1e-10)
    torch.testing.assert_close(merged.covariance(), one.covariance(), rtol=1e-10, atol=1e-9)
    all_at_once = CovarianceAccumulator.merge_all(accs)
    torch.testing.assert_close(all_at_once.scatter, merged.scatter, rtol=1e-12, atol=1e-9)
    assert accs[0].n == sizes[0]  # merge does not change its inputs


def test_merge_in_place_and_empty():
    x = low_rank_data(n=300, d=8)
    acc = CovarianceAccumulator(8).update(x)
    empty = CovarianceAccumulator(8)
    a = acc.merge(empty)
    b = empty.merge(acc)
    for m in (a, b):
        assert m.n == 300
        torch.testing.assert_close(m.mean, acc.mean)
        torch.testing.assert_close(m.scatter, acc.scatter)
    c = CovarianceAccumulator(8).update(x[:100])
    assert c.merge_(CovarianceAccumulator(8).update(x[100:])) is c
    torch.testing.assert_close(c.covariance(), acc.covariance(), rtol=1e-12, atol=1e-12)
    with pytest.raises(RanklensError, match="d=9"):
        acc.merge(CovarianceAccumulator(9))


def test_state_dict_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    x = low_rank_data(n=500, d=12)
    acc = CovarianceAccumulator(12).update(x, norm_bounds=1e9)
    state = acc.state_dict()
    assert isinstance(state["n"], int) and isinstance(state["n_excluded"], int)
    back = CovarianceAccumulator.from_state_dict(state)
    assert back.n == acc.n and back.n_excluded == acc.n_excluded
    assert torch.equal(back.mean, acc.mean) and torch.equal(back.scatter, acc.scatter)
    # through safetensors, with the ints wrapped as tensors
    path = tmp_path / "acc.safetensors"
    save_file({k: v if isinstance(v, torch.Tensor) else torch.tensor(v) for k, v in state.items()}, str(path))
    back2 = CovarianceAccumulator.from_state_dict(load_file(str(path)))
    assert back2.n == 500 and torch.equal(back2.scatter, acc.scatter)
    # restored states keep accumulating like the original
    more = low_rank_data(n=200, d=12, seed=5)
    torch.testing.assert_close(back.update(more).scatter, acc.update(more).scatter)
    with pytest.raises(RanklensError, match="scatter"):
        CovarianceAccumulator.from_state_dict({"n": 1, "mean": torch.zeros(3), "scatter": torch.zeros(2, 2)})


def test_norm_clip_drops_outliers():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5000, 16, generator=g, dtype=torch.float64)
    outliers = torch.zeros(3, 16, dtype=torch.float64)
    outliers[:, 0] = torch.tensor([50.0, -80.0, 120.0])
    data = torch.cat([x[:2000], outliers, x[2000:]])
    stats = NormStats()
    for batch in uneven_batches(data):
        stats.update(batch)
    norms = data.norm(dim=1)
    assert stats.n == data.shape[0]
    assert stats.mean == pytest.approx(float(norms.mean()), rel=1e-12)
    assert stats.std == pytest.approx(float(norms.std(correction=0)), rel=1e-10)
    bound = stats.upper_bound(5.0)
    expected_drop = norms > bound
    assert int(expected_drop.sum()) == 3  # exactly the planted outliers

    acc = CovarianceAccumulator(16, norm_clip_sigma=5.0)
    for batch in uneven_batches(data):
        acc.update(batch, norm_bounds=stats)
    assert acc.n_excluded == 3 and acc.n == 5000
    ref = feed(data[~expected_drop])
    torch.testing.assert_close(acc.covariance(), ref.covariance(), rtol=1e-10, atol=1e-12)
    assert acc.state_dict()["n_excluded"] == 3
    assert acc.merge(acc).n_excluded == 6

    # NormStats merge == one pass
    s1, s2 = NormStats().update(data[:1234]), NormStats().update(data[1234:] + 3.0)
    one = NormStats().update(torch.cat([data[:1234], data[1234:] + 3.0]))
    m = s1.merge(s2)
    assert (
        m.n == one.n
        and m.mean == pytest.approx(one.mean, rel=1e-13)
        and m.std == pytest.approx(one.std, rel=1e-10)
    )
    assert NormStats.from_state_dict(m.state_dict()).std == m.std

    with pytest.raises(RanklensError, match="needs norm_bounds"):
        acc.update(x)
    with pytest.raises(RanklensError, match="needs norm_clip_sigma"):
        CovarianceAccumulator(16).update(x, norm_bounds=stats)


def test_bad_input():
    acc = CovarianceAccumulator(4)
    with pytest.raises(RanklensError, match="d=4"):
        acc.update(torch.zeros(3, 5))
    with pytest.raises(RanklensError, match="floating"):
        acc.update(torch.zeros(3, 4, dtype=torch.int64))
    with pytest.raises(RanklensError, match="shape"):
        acc.update(torch.zeros(4))
    with pytest.raises(RanklensError, match="NaN"):
        acc.update(torch.tensor([[0.0, 1.0, float("nan"), 2.0]]))
    assert acc.n == 0
    with pytest.raises(RanklensError, match="n=0"):
        _ = acc.mean
    with pytest.raises(RanklensError, match="ddof"):
        acc.update(torch.zeros(1, 4)).covariance(ddof=1)
    with pytest.raises(RanklensError, match="d=0"):
        CovarianceAccumulator(0)
    with pytest.raises(RanklensError, match="norm_clip_sigma"):
        CovarianceAccumulator(4, norm_clip_sigma=-1.0)
    with pytest.raises(RanklensError, match="NormStats"):
        _ = NormStats().mean


def test_drifting_mean_stays_exact():
    """A first batch far from the rest (where a fixed first-batch shift would cancel catastrophically)."""
    g = torch.Generator().manual_seed(12)
    first = torch.randn(50, 8, generator=g, dtype=torch.float64)
    rest = 1e6 + 1e-2 * torch.randn(3000, 8, generator=g, dtype=torch.float64)
    x = torch.cat([first, rest])
    acc = CovarianceAccumulator(8).update(first)
    for batch in uneven_batches(rest):
        acc.update(batch)
    xc = x - x.mean(0)
    torch.testing.assert_close(acc.covariance(), xc.T @ xc / x.shape[0], rtol=1e-9, atol=0)
    rest_only = feed(rest)
    rc = rest - rest.mean(0)
    torch.testing.assert_close(rest_only.covariance(), rc.T @ rc / rest.shape[0], rtol=1e-6, atol=0)


@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_float32_gram_accuracy(offset):
    """The fast path: float32 chunk Gram matrices, float64 state. Against the dense SVD on a spectrum spanning three
    decades: singular values above 1% of the largest stay within 1e-6 relative (measured: <2e-7); the tail near
    1e-3 of the largest is off by ~2e-3 (eigenvalues 1e-6 of the top one are at float32's resolution), which moves
    the effective rank by ~3e-5 relative."""
    from ranklens.linalg.basis import effective_rank

    x = low_rank_data() + offset
    fast = feed(x.float(), gram_dtype=torch.float32)
    ref = dense_sv(x.float().double())
    assert max_rel_err(singular_values(fast), ref, rel=1e-2) < 1e-6
    assert effective_rank(singular_values(fast)) == pytest.approx(effective_rank(ref), rel=1e-4)


@pytest.mark.parametrize("d, block", [(5, 96), (200, 96), (577, 96), (130, 7)])
def test_symmetric_gram_matches_dense_product(d, block):
    y = torch.randn(300, d, dtype=torch.float64)
    gram = symmetric_gram(y, block=block)
    torch.testing.assert_close(gram, y.T @ y, rtol=1e-12, atol=1e-10)
    assert torch.equal(gram, gram.T)  # mirrored, so exactly symmetric


def test_non_finite_row_is_reported_with_its_count():
    x = torch.randn(50, 8)
    x[3, 2] = float("inf")
    x[7, 0] = float("nan")
    with pytest.raises(RanklensError, match="2 row"):
        CovarianceAccumulator(8).update(x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_update_leaves_the_callers_tensor_untouched(dtype):
    x = torch.randn(40, 6, dtype=dtype) + 3.0
    before = x.clone()
    CovarianceAccumulator(6, gram_dtype=dtype).update(x)
    assert torch.equal(x, before)
