"""The dashboard's streaming statistics equal a brute-force computation over all firings at once."""

import torch

from ranklens.dashboard.stats import LOG_EDGES, FeatureStats, priority


def _code(n_tokens, n_features, k, seed):
    g = torch.Generator().manual_seed(seed)
    pre = torch.randn(n_tokens, n_features, generator=g).exp() * (torch.rand(n_features, generator=g) * 3)
    pre[:, : n_features // 10] = 0.0  # dead features
    values, indices = pre.topk(k, dim=1)
    values[torch.rand(values.shape, generator=g) < 0.1] = 0.0  # picked but not firing
    values[0, 0] = values[1, 0] = 1e-7  # below the log grid
    return values, indices


def _brute(values, indices, n_features, n_top, n_sample, seed):
    live = values > 0
    feat, val = indices[live], values[live]
    tok = torch.arange(values.shape[0])[:, None].expand_as(values)[live]
    out = {}
    for f in range(n_features):
        sel = feat == f
        t, v = tok[sel].tolist(), val[sel].tolist()
        by_value = sorted(zip(t, v, strict=True), key=lambda e: (-e[1], e[0]))[:n_top]
        pr = priority(torch.tensor(t, dtype=torch.int64), torch.full((len(t),), f), seed).tolist()
        by_priority = [(t[i], v[i]) for i in sorted(range(len(t)), key=lambda i: (pr[i], t[i]))[:n_sample]]
        out[f] = (len(t), sum(v), max(v, default=0.0), by_value, by_priority, v)
    return out


def test_streaming_equals_brute_force_whatever_the_batches():
    n_tokens, n_features, k = 600, 40, 6
    values, indices = _code(n_tokens, n_features, k, 0)
    brute = _brute(values, indices, n_features, 7, 11, seed=3)
    for batch in (1, 37, 600):
        stats = FeatureStats(n_features, n_top=7, n_sample=11, seed=3)
        for i in range(0, n_tokens, batch):
            stats.update(values[i:i + batch], indices[i:i + batch], torch.arange(i, min(i + batch, n_tokens)))
        assert stats.tokens == n_tokens
        for f in range(n_features):
            count, total, peak, top, sample, vals = brute[f]
            assert int(stats.count[f]) == count
            assert abs(float(stats.total[f]) - total) <= 1e-9 * max(1.0, total)
            assert float(stats.max[f]) == peak
            assert stats.top_entries(f) == top
            assert stats.sample_entries(f) == sample
            grid = torch.bucketize(torch.tensor(vals, dtype=torch.float64), LOG_EDGES)
            assert torch.equal(stats.grid[f], torch.bincount(grid, minlength=len(LOG_EDGES) + 1))


def test_histogram_intervals_and_priority():
    values, indices = _code(300, 20, 4, 1)
    stats = FeatureStats(20, n_top=5, n_sample=50)
    stats.update(values, indices, torch.arange(300))
    f = int(stats.count.argmax())
    hist = stats.histogram(f, max_bins=10)
    assert sum(hist["counts"]) == int(stats.count[f]) and len(hist["edges"]) == len(hist["counts"]) + 1 <= 11
    assert hist["edges"][0] <= float(stats.max[f]) <= hist["edges"][-1]
    peak = float(stats.max[f])
    for interval in stats.intervals(f):
        lo, hi = interval["range"]
        assert 0 <= lo < hi <= peak * (1 + 1e-12) and len(interval["examples"]) <= 5
        assert all(lo < v <= hi for _, v in interval["examples"])
    dead = int((stats.count == 0).nonzero()[0])
    assert stats.histogram(dead) == {"edges": [], "counts": []} and stats.intervals(dead) == []
    assert torch.isnan(stats.mean()[dead])
    p = priority(torch.arange(10_000), torch.zeros(10_000, dtype=torch.int64), 0)
    assert p.unique().numel() > 9_990 and int(p.min()) >= 1 and int(p.max()) < 2**31 - 1
    assert abs(float((p < 2**30).double().mean()) - 0.5) < 0.03  # spread over the range
