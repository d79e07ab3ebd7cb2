"""Lorsa initializers: App. O.2 random init, App. B.3 QK copy, and ASI for Lorsa (App. K) against the pseudo-code's
dense SVD."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from ranklens.dictionaries.lorsa import Lorsa, LorsaConfig
from ranklens.dictionaries.lorsa_init import (
    head_value_subspaces,
    init_asi_,
    init_default_,
    init_qk_from_mhsa_,
    qk_source_heads,
)
from ranklens.errors import RanklensError
from ranklens.linalg.accumulator import CovarianceAccumulator
from ranklens.lm.attention import mhsa_weights
from ranklens.lm.capture import capture
from tiny_models import tiny_batch, tiny_model


@functools.cache
def _model(name: str, dtype: torch.dtype = torch.float64):
    return tiny_model(name, dtype=dtype)


@functools.cache
def _inputs(name: str = "llama") -> torch.Tensor:
    """Attention inputs of layer 1, [320, 64] float64 (8 sequences of 40 tokens, no padding)."""
    model = _model(name)
    ids, _ = tiny_batch(model, batch=8, seq=40, pad=0, seed=3)
    return capture(model, "L1.attn_in", ids)["L1.attn_in"].reshape(-1, 64).clone()


def _lorsa(w, n_heads=64, n_qk_groups=8, k=8, seed=0, **kw) -> Lorsa:
    lorsa = Lorsa(LorsaConfig.from_mhsa(w, n_heads=n_heads, n_qk_groups=n_qk_groups, k=k, **kw))
    return init_default_(lorsa, torch.Generator().manual_seed(seed))


# ---- App. O.2 -------------------------------------------------------------------------------------------------------


def test_init_default_statistics():
    cfg = LorsaConfig(d_model=64, n_heads=4096, n_qk_groups=32, d_qk=16, k=8, use_output_bias=True)
    lorsa = init_default_(Lorsa(cfg), torch.Generator().manual_seed(0))
    assert abs(lorsa.W_V.std().item() * math.sqrt(4096) - 1) < 0.03  # std 1/sqrt(H) (d_sae = H)
    assert abs(lorsa.W_O.std().item() * math.sqrt(64) - 1) < 0.03  # std 1/sqrt(d_model)
    assert abs(lorsa.W_V.mean().item()) < 1e-3 and abs(lorsa.W_O.mean().item()) < 1e-2
    bound = math.sqrt(6 / (64 + 16))  # Xavier uniform per group's d -> d_qk map
    for W in (lorsa.W_Q, lorsa.W_K):
        assert W.abs().max().item() <= bound and W.abs().max().item() > 0.99 * bound
        assert abs(W.var().item() / (bound**2 / 3) - 1) < 0.05
    for b in (lorsa.b_Q, lorsa.b_K, lorsa.b_V, lorsa.b_O):
        assert (b == 0).all()
    again = init_default_(Lorsa(cfg), torch.Generator().manual_seed(0))
    other = init_default_(Lorsa(cfg), torch.Generator().manual_seed(1))
    assert torch.equal(again.W_V, lorsa.W_V) and torch.equal(again.W_Q, lorsa.W_Q)
    assert not torch.equal(other.W_V, lorsa.W_V)


# ---- App. B.3: QK from the MHSA -------------------------------------------------------------------------------------


def test_qk_source_heads():
    assert qk_source_heads(8, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert qk_source_heads(8, 4, "cyclic").tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    with pytest.raises(RanklensError, match="'blocks'"):
        qk_source_heads(8, 4, "blocks")


@pytest.mark.parametrize("assignment", ["block", "cyclic"])
def test_init_qk_copies_with_gqa_expansion(assignment):
    w = mhsa_weights(_model("llama"), 1)  # 4 query heads, 2 KV heads, no biases
    lorsa = _lorsa(w)
    with torch.no_grad():
        lorsa.b_Q.fill_(1.0)
        lorsa.b_K.fill_(1.0)
    init_qk_from_mhsa_(lorsa, w, assignment=assignment)
    for g in range(8):
        h = g // 2 if assignment == "block" else g % 4
        assert torch.equal(lorsa.W_Q[g], w.W_Q[h])
        assert torch.equal(lorsa.W_K[g], w.W_K[h // 2])  # the query head's KV group
    assert (lorsa.b_Q == 0).all() and (lorsa.b_K == 0).all()  # the model has no q/k biases
    assert lorsa.W_Q.requires_grad and lorsa.b_K.requires_grad


def test_init_qk_frozen_and_biases_and_norms():
    w = mhsa_weights(_model("qwen2"), 0)
    lorsa = _lorsa(w, n_heads=32, n_qk_groups=4)
    init_qk_from_mhsa_(lorsa, w, trainable=False)
    assert torch.equal(lorsa.b_Q, w.b_Q) and torch.equal(lorsa.b_K, w.b_K[[0, 0, 1, 1]])
    for p in (lorsa.W_Q, lorsa.b_Q, lorsa.W_K, lorsa.b_K):
        assert not p.requires_grad
    assert lorsa.W_V.requires_grad and lorsa.W_O.requires_grad
    init_qk_from_mhsa_(lorsa, w, trainable=True)
    assert lorsa.W_Q.requires_grad

    w3 = mhsa_weights(_model("qwen3"), 0)
    lorsa3 = _lorsa(w3, n_heads=32, n_qk_groups=4)
    assert lorsa3.cfg.qk_norm and lorsa3.cfg.d_qk == 24
    init_qk_from_mhsa_(lorsa3, w3)
    for g in range(4):
        assert torch.equal(lorsa3.q_norm_weight[g], w3.q_norm.weight)
        assert torch.equal(lorsa3.k_norm_weight[g], w3.k_norm.weight)


def test_init_qk_checks():
    w = mhsa_weights(_model("llama"), 1)
    with pytest.warns(RuntimeWarning, match="fewer than the MHSA's 4 heads"):
        init_qk_from_mhsa_(_lorsa(w, n_heads=16, n_qk_groups=2), w)
    with pytest.raises(RanklensError, match="d_qk 8 differs from the MHSA's d_head 16"):
        init_qk_from_mhsa_(_lorsa(w, d_qk=8, positions=None), w)
    with pytest.warns(RuntimeWarning, match="rotary_dim None"):
        init_qk_from_mhsa_(_lorsa(w, positions=None), w)
    other = Lorsa(LorsaConfig(d_model=32, n_heads=16, n_qk_groups=4, d_qk=16, k=4))
    with pytest.raises(RanklensError, match="d_model 32 does not match the MHSA's d_model 64"):
        init_qk_from_mhsa_(other, w)


# ---- App. K: ASI for Lorsa ------------------------------------------------------------------------------------------


def _canon(P: torch.Tensor) -> torch.Tensor:
    idx = P.abs().argmax(dim=0)
    return P * torch.sign(P.gather(0, idx[None]))


def dense_asi_reference(W_V, W_O, w, X, d_init):
    """The "Use on Lorsa" pseudo-code of Appendix K, literally (TransformerLens layouts, dense SVD of [N, d])."""
    n, dh, d = w.n_heads, w.d_head, w.d_model
    mhsa_W_V = torch.stack([w.W_V[w.kv_group(i)].T for i in range(n)])  # [n, d, h]
    mhsa_W_O = torch.stack([w.W_O_head(i).T for i in range(n)])  # [n, h, d]
    W_V_cat = mhsa_W_V.permute(1, 0, 2).reshape(d, n * dh)
    V_per_head = (X @ W_V_cat).reshape(-1, n, dh)
    captured_v = torch.einsum("bnh,nhd->bnd", V_per_head, mhsa_W_V.permute(0, 2, 1))
    rate = W_V.shape[0] // n
    W_V, W_O, projs = W_V.clone(), W_O.clone(), []
    for i in range(n):
        sl = slice(rate * i, rate * (i + 1))
        v = captured_v[:, i, :]
        demeaned_v = v - v.mean(dim=0)
        U, S, _ = torch.linalg.svd(demeaned_v.T, full_matrices=False)
        proj = _canon(U[:, :d_init])
        projs.append(proj)
        W_V[sl] = W_V[sl, :d_init] @ proj.T
        W_O[sl] = W_V[sl] @ mhsa_W_V[i] @ mhsa_W_O[i]
    W_V = W_V / W_V.norm(dim=1, keepdim=True)
    W_O = W_O / W_O.norm(dim=1, keepdim=True)
    return W_V, W_O, torch.stack(projs)


@pytest.mark.parametrize("d_init", [16, 6])
def test_asi_streaming_equals_dense_svd(d_init):
    w = mhsa_weights(_model("llama"), 1)
    X = _inputs()
    lorsa = _lorsa(w)
    W_V0, W_O0 = lorsa.W_V.detach().clone(), lorsa.W_O.detach().clone()
    ref_V, ref_O, ref_P = dense_asi_reference(W_V0, W_O0, w, X, d_init)
    P = head_value_subspaces(w, X, d_init)
    torch.testing.assert_close(P, ref_P, rtol=0, atol=1e-8)
    init_asi_(lorsa, w, X, d_init=d_init)
    torch.testing.assert_close(lorsa.W_V.detach(), ref_V, rtol=0, atol=1e-8)
    torch.testing.assert_close(lorsa.W_O.detach(), ref_O, rtol=0, atol=1e-8)


def test_asi_input_forms_agree():
    w = mhsa_weights(_model("llama"), 1)
    X = _inputs()
    acc = CovarianceAccumulator(64)
    for part in X.split(50):
        acc.update(part)
    P = head_value_subspaces(w, X, 16)
    torch.testing.assert_close(head_value_subspaces(w, acc, 16), P, rtol=0, atol=1e-10)
    torch.testing.assert_close(head_value_subspaces(w, iter(X.split(70)), 16), P, rtol=0, atol=1e-10)
    torch.testing.assert_close(head_value_subspaces(w, X.reshape(8, 40, 64), 16), P, rtol=0, atol=1e-10)


def test_asi_rows_lie_in_head_subspaces_and_are_unit_norm():
    w = mhsa_weights(_model("llama"), 1)
    X = _inputs()
    d_init = 8
    lorsa = init_asi_(_lorsa(w), w, X, d_init=d_init, qk_trainable=False)
    P = head_value_subspaces(w, X, d_init).to(lorsa.W_V.dtype)
    W_V, W_O = lorsa.W_V.detach(), lorsa.W_O.detach()
    torch.testing.assert_close(W_V.norm(dim=1), torch.ones(64, dtype=W_V.dtype))
    torch.testing.assert_close(W_O.norm(dim=1), torch.ones(64, dtype=W_O.dtype))
    rate = 64 // 4
    for i in range(4):
        rows = W_V[rate * i : rate * (i + 1)]
        Pi = P[i]
        torch.testing.assert_close(rows @ Pi @ Pi.T, rows, rtol=0, atol=1e-10)  # in span of P_i
        other = P[(i + 2) % 4]  # a head of the other KV group reads another subspace
        assert (rows @ other).norm() < 0.99 * rows.norm()
        # W_O: the head's OV circuit applied to the value direction, normalized.
        ov = rows @ w.W_V[w.kv_group(i)].T @ w.W_O_head(i).T
        torch.testing.assert_close(W_O[rate * i : rate * (i + 1)], ov / ov.norm(dim=1, keepdim=True))
    # Q/K copied from the MHSA head owning the block (block assignment), frozen as asked.
    for g in range(8):
        assert torch.equal(lorsa.W_Q[g], w.W_Q[g // 2])
    assert not lorsa.W_Q.requires_grad and lorsa.W_V.requires_grad


def test_asi_without_qk_copy_and_uneven_heads():
    w = mhsa_weights(_model("llama"), 1)
    X = _inputs()
    lorsa = _lorsa(w, n_heads=66, n_qk_groups=6)  # 66 = 4 * 16 + 2 heads left over; G=6 not a multiple of 4
    W_Q0, extra0 = lorsa.W_Q.detach().clone(), lorsa.W_V.detach()[64:].clone()
    init_asi_(lorsa, w, X, copy_qk=False)
    assert torch.equal(lorsa.W_Q, W_Q0)
    torch.testing.assert_close(lorsa.W_V.detach()[64:], extra0 / extra0.norm(dim=1, keepdim=True))
    with pytest.warns(RuntimeWarning, match="not a multiple"):
        init_asi_(_lorsa(w, n_heads=66, n_qk_groups=6), w, X)


def test_asi_errors():
    w = mhsa_weights(_model("llama"), 1)
    X = _inputs()
    with pytest.raises(RanklensError, match="fewer than the MHSA's 4"):
        init_asi_(_lorsa(w, n_heads=2, n_qk_groups=2, k=2), w, X)
    with pytest.raises(RanklensError, match="d_init=65"):
        init_asi_(_lorsa(w), w, X, d_init=65)
    with pytest.raises(RanklensError, match=r"d=64, got shape \(10, 32\)"):
        init_asi_(_lorsa(w), w, torch.zeros(10, 32, dtype=torch.float64))
    with pytest.raises(RanklensError, match="at least 2 tokens"):
        init_asi_(_lorsa(w), w, X[:1])
    with pytest.warns(RuntimeWarning, match="exceeds d_head"):
        head_value_subspaces(w, X, 20)
