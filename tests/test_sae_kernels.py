"""Sparse SAE kernels against naive dense references (paper Section 3.2; Rajamanoharan et al. 2024; Bussmann et al.)."""

import pytest
import torch

from ranklens.dictionaries import kernels
from ranklens.dictionaries.kernels import (
    batch_topk,
    batch_topk_threshold,
    dense_topk_code,
    jumprelu,
    rectangle,
    sparse_decode,
    step,
    topk_encode,
)
from ranklens.errors import RanklensError


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def _problem(B=12, d=10, n=40, dtype=torch.float64, seed=0, bias_shift=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g, dtype=torch.float64)
    W = torch.randn(n, d, generator=g, dtype=torch.float64) / d**0.5
    b = torch.randn(n, generator=g, dtype=torch.float64) * 0.1 + bias_shift
    R = torch.randn(B, n, generator=g, dtype=torch.float64)  # upstream gradient on the dense code
    return x.to(dtype), W.to(dtype), b.to(dtype), R.to(dtype)


def _scatter(values, indices, n):
    return values.new_zeros(values.shape[0], n).scatter(1, indices, values)


def _kernel_vs_reference(x, W, b, R, k, chunk_rows=None):
    xk, Wk, bk = _leaf(x), _leaf(W), _leaf(b)
    values, indices = topk_encode(xk, Wk, bk, k, chunk_rows=chunk_rows)
    zk = _scatter(values, indices, W.shape[0])
    (zk * R).sum().backward()
    xr, Wr, br = _leaf(x), _leaf(W), _leaf(b)
    zr = dense_topk_code(xr @ Wr.T + br, k)
    (zr * R).sum().backward()
    return (values, indices, zk, xk, Wk, bk), (zr, xr, Wr, br)


@pytest.mark.parametrize("chunk_rows", [None, 5])
@pytest.mark.parametrize("bias_shift", [0.0, -1.0])  # -1: most pre-activations negative, some inside the top-k
def test_topk_encode_matches_dense_reference_float64(chunk_rows, bias_shift):
    x, W, b, R = _problem(bias_shift=bias_shift)
    k = 7
    (values, indices, zk, xk, Wk, bk), (zr, xr, Wr, br) = _kernel_vs_reference(x, W, b, R, k, chunk_rows)
    assert values.shape == indices.shape == (x.shape[0], k)
    assert indices.dtype == torch.int64
    assert bool((indices[:, 1:] > indices[:, :-1]).all()), "indices ascending within each row"
    assert bool((values >= 0).all())
    torch.testing.assert_close(zk, zr, rtol=0, atol=1e-12)
    for a, r in ((xk, xr), (Wk, Wr), (bk, br)):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-10, atol=1e-12)


def test_topk_encode_negative_selected_preactivations_get_zero_value_and_gradient():
    x, W, b, R = _problem(bias_shift=-3.0)  # nearly every pre-activation negative
    k = 6
    pre = x @ W.T + b
    assert int((pre > 0).sum(1).min()) < k, "the test needs rows with fewer than k positive pre-activations"
    (values, indices, zk, xk, Wk, bk), (zr, xr, Wr, br) = _kernel_vs_reference(x, W, b, R, k)
    sel_pre = pre.gather(1, indices)
    assert bool((values[sel_pre <= 0] == 0).all())
    # b_E's gradient is zero for features that were selected only with negative pre-activations, and equals R's
    # column sum over the tokens where the feature was selected with a positive pre-activation.
    expected_b = torch.zeros_like(b).index_add_(0, indices[sel_pre > 0], R.gather(1, indices)[sel_pre > 0])
    torch.testing.assert_close(bk.grad, expected_b, rtol=1e-12, atol=1e-12)
    for a, r in ((xk, xr), (Wk, Wr), (bk, br)):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-10, atol=1e-12)


def test_topk_encode_exact_ties_are_deterministic_and_match_the_reference():
    # Integer data in float64: products and sums are exact, so duplicated encoder rows give exactly tied
    # pre-activations, including at the k-th place.
    g = torch.Generator().manual_seed(3)
    B, d, n, k = 16, 6, 24, 5
    x = torch.randint(-3, 4, (B, d), generator=g).double()
    base = torch.randint(-2, 3, (n // 3, d), generator=g).double()
    W = base.repeat(3, 1)  # every encoder row appears three times
    b = torch.zeros(n, dtype=torch.float64)
    R = torch.randn(B, n, generator=g, dtype=torch.float64)
    pre = x @ W.T
    kth = pre.topk(k, dim=1).values[:, -1:]
    assert int(((pre == kth).sum(1) > 1).sum()) > 0, "the test needs ties at the k-th place"
    out1 = topk_encode(x, W, b, k)
    out2 = topk_encode(x, W, b, k)
    assert torch.equal(out1[1], out2[1]) and torch.equal(out1[0], out2[0])
    (values, indices, zk, xk, Wk, bk), (zr, xr, Wr, br) = _kernel_vs_reference(x, W, b, R, k)
    torch.testing.assert_close(zk, zr, rtol=0, atol=0)
    for a, r in ((xk, xr), (Wk, Wr), (bk, br)):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-12, atol=1e-12)


def _index_reference_grads(x32, W32, values, indices, Rg):
    """Float32 gradients for given (fixed) indices: G holds the ReLU-masked upstream gradient at the pairs."""
    n = W32.shape[0]
    G = torch.zeros(x32.shape[0], n, dtype=torch.float32).scatter(1, indices, Rg * (values.float() > 0))
    return G @ W32, G.T @ x32, G.sum(0)


@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float32])
def test_topk_encode_bfloat16_input(param_dtype):
    x, W, b, R = _problem(B=32, d=16, n=64, dtype=torch.float32, seed=5)
    xb = x.bfloat16()
    Wp, bp = W.to(param_dtype), b.to(param_dtype)
    xk, Wk, bk = _leaf(xb), _leaf(Wp), _leaf(bp)
    values, indices = topk_encode(xk, Wk, bk, 8)
    assert values.dtype == torch.bfloat16
    # The selection is a top-k of the bf16 pre-activations the kernel computed (matmul in the input's dtype).
    pre_b = torch.addmm(bp.bfloat16(), xb, Wp.bfloat16().T).float()
    chosen = pre_b.gather(1, indices)
    rest = pre_b.scatter(1, indices, float("-inf"))
    assert bool((chosen.min(1).values >= rest.max(1).values).all())
    torch.testing.assert_close(values.float(), chosen.clamp_min(0), rtol=0, atol=0)
    Rg = R.gather(1, indices)
    (values.float() * Rg).sum().backward()
    # values are bf16, so the upstream gradient reaching the kernel is Rg rounded to bf16.
    gx, gW, gb = _index_reference_grads(xb.float(), Wp.float(), values, indices, Rg.bfloat16().float())
    assert xk.grad.dtype == torch.bfloat16 and Wk.grad.dtype == param_dtype and bk.grad.dtype == param_dtype
    tol = dict(rtol=1e-2, atol=1e-2) if param_dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(Wk.grad.float(), gW, **tol)
    torch.testing.assert_close(bk.grad.float(), gb, **tol)
    torch.testing.assert_close(xk.grad.float(), gx, rtol=2e-2, atol=2e-2)


def test_topk_encode_errors():
    x, W, b, _ = _problem()
    with pytest.raises(RanklensError, match="k=41"):
        topk_encode(x, W, b, 41)
    with pytest.raises(RanklensError, match="k=0"):
        topk_encode(x, W, b, 0)
    with pytest.raises(RanklensError, match="last dimension 9.*d_in=10"):
        topk_encode(x[:, :9], W, b, 3)
    with pytest.raises(RanklensError, match="b_E"):
        topk_encode(x, W, b[:5], 3)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_sparse_decode_matches_dense_decode(dtype, tol):
    g = torch.Generator().manual_seed(1)
    B, d, n, k = 20, 12, 50, 6
    indices = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(B)])  # unsorted rows on purpose
    values = torch.rand(B, k, generator=g, dtype=torch.float64).to(dtype)
    W = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(d, generator=g, dtype=torch.float64).to(dtype)
    go = torch.randn(B, d, generator=g, dtype=torch.float64)
    vk, Wk, bk = _leaf(values), _leaf(W), _leaf(b)
    out = sparse_decode(vk, indices, Wk, bk)
    assert out.dtype == dtype
    (out.double() * go).sum().backward()
    # Dense reference in float64 from the same (rounded) inputs.
    vr, Wr, br = _leaf(values.double()), _leaf(W.double()), _leaf(b.double())
    ref = _scatter(vr, indices, n) @ Wr + br
    (ref * go).sum().backward()
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    for a, r in ((vk, vr), (Wk, Wr), (bk, br)):
        assert a.grad.dtype == dtype
        torch.testing.assert_close(a.grad.double(), r.grad, rtol=tol, atol=tol * 10)


def test_sparse_decode_bfloat16_weight_gradient_accumulates_in_float32():
    # One feature used by every token: its gradient is a sum over 4096 tokens, which bf16 accumulation would ruin.
    g = torch.Generator().manual_seed(2)
    B, d, n = 4096, 8, 16
    indices = torch.zeros(B, 1, dtype=torch.int64)
    values = torch.rand(B, 1, generator=g).bfloat16()
    W = _leaf(torch.randn(n, d, generator=g).bfloat16())
    go = torch.randn(B, d, generator=g).bfloat16()
    sparse_decode(values, indices, W, torch.zeros(d, dtype=torch.bfloat16)).backward(go)
    exact = (values.double() * go.double()).sum(0)
    torch.testing.assert_close(W.grad[0].double(), exact, rtol=1e-2, atol=0.0)


def test_sparse_decode_errors():
    W = torch.zeros(10, 4)
    with pytest.raises(RanklensError, match="values has shape"):
        sparse_decode(torch.zeros(3, 2), torch.zeros(3, 5, dtype=torch.int64), W, torch.zeros(4))
    with pytest.raises(RanklensError, match="b_D has shape"):
        sparse_decode(torch.zeros(3, 2), torch.zeros(3, 2, dtype=torch.int64), W, torch.zeros(5))


# --------------------------------------------------------------------------- BatchTopK


def _batch_topk_naive(pre, k):
    acts = torch.relu(pre)
    flat = sorted(acts.reshape(-1).tolist(), reverse=True)
    cut = flat[pre.shape[0] * k - 1]
    return torch.where((acts >= cut) & (acts > 0), acts, torch.zeros_like(acts))


def test_batch_topk_matches_naive_reference_and_keeps_b_times_k():
    g = torch.Generator().manual_seed(4)
    pre = _leaf(torch.randn(9, 30, generator=g, dtype=torch.float64))
    k = 4
    code = batch_topk(pre, k)
    assert int((code != 0).sum()) == 9 * k
    assert (code != 0).sum(1).tolist() != [k] * 9, "per-token counts vary (this is BatchTopK, not TopK)"
    torch.testing.assert_close(code, _batch_topk_naive(pre.detach(), k), rtol=0, atol=0)
    R = torch.randn(9, 30, generator=g, dtype=torch.float64)
    (code * R).sum().backward()
    torch.testing.assert_close(pre.grad, R * (code != 0), rtol=0, atol=0)


def test_batch_topk_with_few_positives_and_threshold():
    pre = -torch.ones(4, 10, dtype=torch.float64)
    pre[0, :3] = torch.tensor([1.0, 2.0, 3.0])
    code = batch_topk(pre, 2)  # 8 slots, only 3 positive entries
    assert int((code != 0).sum()) == 3
    assert float(batch_topk_threshold(code)) == 1.0
    thr = batch_topk(pre, 2, threshold=1.5)
    assert thr[0, :3].tolist() == [0.0, 2.0, 3.0] and int((thr != 0).sum()) == 2
    assert batch_topk_threshold(torch.zeros(2, 2)) == float("inf")


# --------------------------------------------------------------------------- JumpReLU (Rajamanoharan et al. 2024)


def test_rectangle_kernel():
    u = torch.tensor([-0.6, -0.5, -0.49, 0.0, 0.49, 0.5, 0.6])
    assert rectangle(u).tolist() == [0, 0, 1, 1, 1, 0, 0]


def test_jumprelu_forward_and_ste_gradients():
    eps = 0.1
    theta = _leaf(torch.tensor([0.5, 1.0, 0.2], dtype=torch.float64))
    z = _leaf(torch.tensor([[0.52, 0.9, 0.0], [0.3, 1.04, 0.26], [0.47, 2.0, 0.14]], dtype=torch.float64))
    g = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 2.0], [4.0, 1.0, -2.0]], dtype=torch.float64)
    out = jumprelu(z, theta, eps)
    H = (z.detach() > theta.detach()).double()
    torch.testing.assert_close(out, z.detach() * H, rtol=0, atol=0)
    out.backward(g)
    K = rectangle((z.detach() - theta.detach()) / eps)
    # Eq. 11: d/dtheta JumpReLU = -(theta / eps) K((z - theta) / eps); d/dz = H(z - theta).
    torch.testing.assert_close(theta.grad, (-(theta.detach() / eps) * K * g).sum(0), rtol=1e-12, atol=0)
    torch.testing.assert_close(z.grad, H * g, rtol=0, atol=0)
    # hand-computed for feature 0: z = 0.52 (in the window, g=1), 0.3 (out), 0.47 (in, g=4): -(0.5/0.1)*(1+4) = -25
    assert float(theta.grad[0]) == pytest.approx(-25.0)


def test_step_forward_and_ste_gradients():
    eps = 0.1
    theta = _leaf(torch.tensor([0.5, 1.0], dtype=torch.float64))
    z = _leaf(torch.tensor([[0.52, 0.9], [0.3, 1.04], [0.47, 2.0]], dtype=torch.float64))
    g = torch.tensor([[1.0, 2.0], [-1.0, 0.5], [4.0, 1.0]], dtype=torch.float64)
    out = step(z, theta, eps)
    torch.testing.assert_close(out, (z.detach() > theta.detach()).double(), rtol=0, atol=0)
    out.backward(g)
    K = rectangle((z.detach() - theta.detach()) / eps)
    # Eq. 12: d/dtheta H(z - theta) = -(1 / eps) K((z - theta) / eps); no gradient to z.
    torch.testing.assert_close(theta.grad, (-(1.0 / eps) * K * g).sum(0), rtol=1e-12, atol=0)
    assert z.grad is None or bool((z.grad == 0).all())
    assert float(theta.grad[1]) == pytest.approx(-0.5 / eps)  # only z = 1.04 lies within eps/2 of theta = 1


def test_jumprelu_errors():
    with pytest.raises(RanklensError, match="theta has shape"):
        jumprelu(torch.zeros(2, 3), torch.zeros(4), 0.1)
    with pytest.raises(RanklensError, match="bandwidth"):
        step(torch.zeros(2, 3), torch.zeros(3), 0.0)


def test_acc_dtype():
    assert kernels._acc_dtype(torch.bfloat16) == torch.float32
    assert kernels._acc_dtype(torch.float64) == torch.float64
