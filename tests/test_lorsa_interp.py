"""Interpretation of a Lorsa: oblique-projection attribution against hand-computed coordinates and a per-token loop,
App. F.2's head count, running top activations against a brute-force sort, and z patterns on a real forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ranklens.analysis.lorsa_attribution import HeadAttribution, heads_needed, oblique_coefficients
from ranklens.analysis.top_activations import TopActivations, context_windows


def test_oblique_coefficients_by_hand():
    b1, b2 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 0.0])  # non-orthogonal
    basis = torch.stack([b1, b2])
    v = 2 * b1 - 3 * b2
    torch.testing.assert_close(oblique_coefficients(v[None], basis), torch.tensor([[2.0, -3.0]], dtype=torch.float64))
    # Outside the span: the coordinates of the orthogonal projection (the z component is dropped).
    w = v + torch.tensor([0.0, 0.0, 5.0])
    torch.testing.assert_close(oblique_coefficients(w[None], basis), torch.tensor([[2.0, -3.0]], dtype=torch.float64))
    # A zero basis vector gets no share.
    zero = torch.stack([b1, torch.zeros(3), b2])
    torch.testing.assert_close(oblique_coefficients(v[None], zero),
                               torch.tensor([[2.0, 0.0, -3.0]], dtype=torch.float64))


def test_heads_needed():
    c = torch.tensor([[0.95, 0.05, 0.0], [0.5, 0.3, 0.2], [0.6, -0.2, 0.5], [0.0, 0.0, 0.0], [0.45, 0.45, 0.1]])
    # row 2: positive shares 0.6/1.1, 0.5/1.1 -> both needed; row 4: 0.9 reached exactly by two heads.
    assert heads_needed(c, 0.9).tolist() == [1, 3, 2, 0, 2]


def test_head_attribution_equals_a_per_token_lstsq_loop():
    g = torch.Generator().manual_seed(0)
    N, n, d, H, K = 7, 3, 6, 10, 3
    O = torch.randn(N, n, d, generator=g, dtype=torch.float64)
    W_O = torch.randn(H, d, generator=g, dtype=torch.float64)
    values = torch.rand(N, K, generator=g, dtype=torch.float64) + 0.1
    values[2, 1] = 0.0  # selected but not active
    indices = torch.stack([torch.randperm(H, generator=g)[:K] for _ in range(N)])
    attr = HeadAttribution(H, n)
    attr.update(O, values, indices, W_O, chunk=3)
    contrib, frac, count = np.zeros((H, n)), np.zeros((H, n)), np.zeros(H)
    for t in range(N):
        live = [k for k in range(K) if values[t, k] > 0]
        Y = np.stack([values[t, k].item() * W_O[indices[t, k]].numpy() for k in live])  # [m, d]
        Ot = O[t].numpy()
        C = np.linalg.lstsq(Y.T, Ot.T, rcond=None)[0]  # [m, n]: o_i = sum_k C[k, i] y_k
        for j, k in enumerate(live):
            h = int(indices[t, k])
            contrib[h] += C[j]
            d_coef = np.linalg.lstsq(Ot.T, Y[j], rcond=None)[0]  # y_k = sum_i d_i o_i
            frac[h] += d_coef * (Ot @ Y[j]) / (Y[j] @ Y[j])
            count[h] += 1
    assert torch.equal(attr.active_tokens, torch.tensor(count, dtype=torch.int64))
    torch.testing.assert_close(attr.contribution_sum, torch.tensor(contrib), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(attr.fraction_sum, torch.tensor(frac), rtol=1e-9, atol=1e-9)
    result = attr.result()
    assert result["heads_with_activity"] == int((count > 0).sum())
    first = result["heads"][0]
    h = first["head"]
    np.testing.assert_allclose(first["contributions"], contrib[h] / count[h], atol=1e-6)


def test_contributions_sum_to_one_when_lorsa_reconstructs_the_heads():
    """App. F.1: with sum_i o_i = sum_k y_k exactly, each Lorsa head's contributions sum to one."""
    g = torch.Generator().manual_seed(1)
    N, n, d, H, K = 5, 4, 12, 20, 6
    W_O = torch.randn(H, d, generator=g, dtype=torch.float64)
    indices = torch.stack([torch.randperm(H, generator=g)[:K] for _ in range(N)])
    values = torch.rand(N, K, generator=g, dtype=torch.float64) + 0.5
    Y = values[..., None] * W_O[indices]  # [N, K, d]
    mix = torch.rand(N, n, K, generator=g, dtype=torch.float64)
    mix = mix / mix.sum(1, keepdim=True)  # each Lorsa output split among the heads
    O = mix @ Y  # [N, n, d]: sum_i o_i = sum_k y_k
    attr = HeadAttribution(H, n)
    attr.update(O, values, indices, W_O)
    for head in attr.result()["heads"]:
        assert head["coverage"] == pytest.approx(1.0, abs=1e-6)


def _brute_force_top(dense: torch.Tensor, n_top: int) -> list[list[tuple[float, int]]]:
    out = []
    for f in range(dense.shape[1]):
        pairs = [(float(v), t) for t, v in enumerate(dense[:, f]) if v > 0]
        out.append(sorted(pairs, key=lambda p: -p[0])[:n_top])
    return out


def test_top_activations_equal_a_brute_force_sort():
    g = torch.Generator().manual_seed(0)
    F_, K, n_top = 12, 3, 4
    top = TopActivations(F_, n_top=n_top, window=3)
    dense_all, seen = [], 0
    for batch in range(5):
        N = 9
        values = torch.rand(N, K, generator=g) - 0.2  # some non-positive entries: not activations
        indices = torch.stack([torch.randperm(F_, generator=g)[:K] for _ in range(N)])
        locations = torch.stack([torch.full((N,), batch), torch.arange(N)], -1)
        contexts = torch.arange(seen, seen + N)[:, None].repeat(1, 3)
        top.update(values, indices, locations, contexts)
        dense = torch.zeros(N, F_).scatter(1, indices, values.clamp_min(0))
        dense_all.append(dense)
        seen += N
    expected = _brute_force_top(torch.cat(dense_all), n_top)
    for f in range(F_):
        got = top.feature(f)
        assert [e["value"] for e in got] == pytest.approx([v for v, _ in expected[f]])
        assert [e["sequence"] * 9 + e["position"] for e in got] == [t for _, t in expected[f]]
        assert [e["context_ids"][0] for e in got] == [t for _, t in expected[f]]


def test_context_windows():
    ids = torch.tensor([[5, 6, 7, 8]])
    w = context_windows(ids, 2, 1)
    assert w[0, 0].tolist() == [-1, -1, 5, 6] and w[0, 3].tolist() == [6, 7, 8, -1]
