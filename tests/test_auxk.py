"""AuxK loss (Gao et al. 2024 A.2; paper App. E.1) against a naive dense reference."""

from __future__ import annotations

import pytest
import torch

from ranklens.train.auxk import auxk_loss

B, N, D, K = 16, 40, 8, 4


def _sae(seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    p = {
        "W_E": torch.randn(N, D, generator=g, dtype=dtype),
        "b_E": torch.randn(N, generator=g, dtype=dtype) * 0.5,
        "W_D": torch.randn(N, D, generator=g, dtype=dtype),
        "b_D": torch.randn(D, generator=g, dtype=dtype),
    }
    p = {k: v.requires_grad_(True) for k, v in p.items()}
    x = torch.randn(B, D, generator=g, dtype=dtype)
    dead = torch.zeros(N, dtype=torch.bool)
    dead[torch.randperm(N, generator=g)[:15]] = True
    return p, x, dead


def _forward(p, x):
    """A TopK SAE forward with its graph: pre-activations and the main reconstruction."""
    pre = x @ p["W_E"].T + p["b_E"]
    vals, idx = pre.topk(K, dim=1)
    z = torch.zeros_like(pre).scatter(1, idx, vals.relu())
    x_hat = z @ p["W_D"] + p["b_D"]
    return pre, x_hat


def _naive(pre, residual, dead, W_D, k_aux):
    """Token by token, dense: mask live features to -inf, top-k, ReLU, dense decode, ratio of sums."""
    e = residual.detach()
    k = min(k_aux, int(dead.sum()))
    err = pre.new_zeros(())
    used = set()
    for t in range(pre.shape[0]):
        masked = torch.where(dead, pre[t], torch.tensor(float("-inf"), dtype=pre.dtype))
        vals, idx = masked.topk(k)
        z = torch.zeros(pre.shape[1], dtype=pre.dtype).index_put((idx,), vals.relu())
        e_hat = z @ W_D
        err = err + ((e_hat - e[t]) ** 2).sum()
        used |= {int(i) for i, v in zip(idx, vals, strict=True) if v > 0}
    var = ((e - e.mean(dim=0)) ** 2).sum()
    return err / var, sorted(used)


def _grads(loss, p):
    for v in p.values():
        v.grad = None
    loss.backward()
    return {k: (None if v.grad is None else v.grad.clone()) for k, v in p.items()}


# 15 = every dead feature; 512 > n_dead is capped; k_aux 1 takes the sparse decoder, 3 and up the dense one
@pytest.mark.parametrize("k_aux", [1, 3, 15, 512])
def test_value_and_gradients_match_naive_reference(k_aux):
    p, x, dead = _sae()
    pre, x_hat = _forward(p, x)
    loss, aux_idx = auxk_loss(pre, x - x_hat, dead, p["W_D"], k_aux)
    got = _grads(loss, p)

    pre, x_hat = _forward(p, x)
    ref, ref_used = _naive(pre, x - x_hat, dead, p["W_D"], k_aux)
    want = _grads(ref, p)

    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    assert aux_idx.dtype == torch.int64 and aux_idx.tolist() == ref_used
    assert set(aux_idx.tolist()) <= set(dead.nonzero().squeeze(1).tolist())
    for k in ("W_E", "b_E", "W_D"):
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12)
    # only the selected features' encoder and decoder rows receive a gradient; the decoder bias none
    touched = torch.zeros(N, dtype=torch.bool)
    touched[aux_idx] = True
    assert not got["W_D"][~touched].any() and not got["W_E"][~touched].any() and not got["b_E"][~touched].any()
    assert got["W_D"][touched].abs().sum(dim=1).gt(0).all()
    assert got["b_D"] is None


def test_residual_is_detached():
    """No gradient reaches the main reconstruction's graph (x_hat's parameters) through the residual."""
    p, x, dead = _sae()
    scale = torch.ones((), dtype=torch.float64, requires_grad=True)  # used only by x_hat
    pre, x_hat = _forward(p, x)
    loss, _ = auxk_loss(pre.detach().requires_grad_(True), x - x_hat * scale, dead, p["W_D"], 4)
    loss.backward()
    assert scale.grad is None and p["b_D"].grad is None and p["W_E"].grad is None


def test_no_dead_features_and_disabled():
    p, x, _ = _sae()
    pre, x_hat = _forward(p, x)
    for dead, k_aux in ((torch.zeros(N, dtype=torch.bool), 512), (torch.ones(N, dtype=torch.bool), 0)):
        loss, idx = auxk_loss(pre, x - x_hat, dead, p["W_D"], k_aux)
        assert float(loss) == 0.0 and not loss.requires_grad
        assert idx.dtype == torch.int64 and idx.numel() == 0


def test_encoder_function_and_leading_dims_give_the_same_result():
    p, x, dead = _sae()
    pre, x_hat = _forward(p, x)
    loss, idx = auxk_loss(pre, x - x_hat, dead, p["W_D"], 5)
    calls = []

    def encode_dead(features):  # evaluates only the dead features' encoder rows
        calls.append(features.numel())
        return (x @ p["W_E"][features].T + p["b_E"][features]).reshape(4, 4, -1)

    loss_fn, idx_fn = auxk_loss(encode_dead, (x - x_hat).reshape(4, 4, D), dead, p["W_D"], 5)
    assert calls == [int(dead.sum())]
    torch.testing.assert_close(loss_fn, loss, rtol=1e-12, atol=0)
    assert torch.equal(idx_fn, idx)


def test_denominator_override_and_zero_variance():
    p, x, dead = _sae()
    pre, x_hat = _forward(p, x)
    e = (x - x_hat).detach()
    loss, _ = auxk_loss(pre, e, dead, p["W_D"], 5)
    total_variance = ((x - x.mean(0)) ** 2).sum()  # sparsify's normalizer: the input's total variance
    loss_x, _ = auxk_loss(pre, e, dead, p["W_D"], 5, denominator=total_variance)
    ratio = ((e - e.mean(0)) ** 2).sum() / total_variance
    torch.testing.assert_close(loss_x, loss * ratio, rtol=1e-12, atol=0)
    # one token: the residual has no variance about its mean; the loss is the plain squared error
    one, _ = auxk_loss(pre[:1], e[:1], dead, p["W_D"], 5)
    plain, _ = auxk_loss(pre[:1], e[:1], dead, p["W_D"], 5, denominator=1.0)
    ref, _ = _naive(pre[:1], e[:1], dead, p["W_D"], 5)  # divides by 0
    assert torch.isfinite(one) and float(one.detach()) > 0 and not torch.isfinite(ref)
    assert torch.equal(one, plain)


def test_float32_and_mixed_dtypes():
    p, x, dead = _sae(dtype=torch.float32)
    pre, x_hat = _forward(p, x)
    loss, _ = auxk_loss(pre, x - x_hat, dead, p["W_D"], 3)
    ref, _ = _naive(pre, x - x_hat, dead, p["W_D"], 3)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
    loss_bf16, _ = auxk_loss(pre.detach(), (x - x_hat).detach(), dead, p["W_D"].detach().bfloat16(), 3)
    assert loss_bf16.dtype == torch.float32 and torch.isclose(loss_bf16, loss.detach(), rtol=3e-2)


def test_one_training_step_with_sparse_adam_touches_only_topk_and_aux_rows():
    """The trainer's contract: active rows = union of the top-k indices and the AuxK indices."""
    from ranklens.train.optim import make_optimizer

    p, x, dead = _sae()
    opt = make_optimizer("sparseadam", [(p["W_E"], True), (p["b_E"], True), (p["W_D"], True), (p["b_D"], False)],
                         lr=1e-2)
    before = {k: v.detach().clone() for k, v in p.items()}
    pre, x_hat = _forward(p, x)
    topk = pre.topk(K, dim=1).indices
    aux, aux_idx = auxk_loss(pre, x - x_hat, dead, p["W_D"], 3)
    (((x - x_hat) ** 2).sum() + aux / 32).backward()
    opt.step(torch.cat([topk.reshape(-1), aux_idx]))
    active = torch.zeros(N, dtype=torch.bool)
    active[topk.reshape(-1)] = True
    active[aux_idx] = True
    assert not torch.isin(aux_idx, topk).all()  # AuxK adds rows the top-k did not select
    for k in ("W_E", "b_E", "W_D"):
        moved = (p[k].detach() != before[k]).reshape(N, -1).any(dim=1)
        assert torch.equal(moved, active), k
    assert not torch.equal(p["b_D"].detach(), before["b_D"])
