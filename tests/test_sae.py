"""SparseAutoencoder: config, forward/backward against a hand-written dense TopK SAE (paper Section 3.2), the other
activations, penalties and the decoder-norm constraint."""

import math

import pytest
import torch

from ranklens.config import Config
from ranklens.dictionaries.kernels import dense_topk_sae_reference
from ranklens.dictionaries.sae import Code, SAEConfig, SparseAutoencoder
from ranklens.errors import RanklensError


def _sae(seed=0, **kw):
    fields = dict(d_in=12, n_features=48, k=5, dtype="float64")
    fields.update(kw)
    return SparseAutoencoder(generator=torch.Generator().manual_seed(seed), **fields)


def _randomize_(sae, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.3)
    return sae


# --------------------------------------------------------------------------- config


def test_config_errors_are_ranklens_errors():
    with pytest.raises(RanklensError, match="needs k"):
        SAEConfig(d_in=4, n_features=8)
    with pytest.raises(RanklensError, match="k=9; expected 1 <= k <= n_features=8"):
        SAEConfig(d_in=4, n_features=8, k=9)
    with pytest.raises(RanklensError, match="k=2 with activation='relu'"):
        SAEConfig(d_in=4, n_features=8, k=2, activation="relu")
    with pytest.raises(RanklensError, match="activation"):
        SAEConfig(d_in=4, n_features=8, k=2, activation="gelu")
    with pytest.raises(RanklensError, match="colour"):
        SAEConfig(d_in=4, n_features=8, k=2, colour="red")
    with pytest.raises(RanklensError, match="n_features=0"):
        SAEConfig(d_in=4, n_features=0, k=1)
    with pytest.raises(RanklensError, match="jumprelu_bandwidth"):
        SAEConfig(d_in=4, n_features=8, activation="jumprelu", jumprelu_bandwidth=0.0)
    with pytest.raises(RanklensError, match="needs k"):
        SparseAutoencoder(d_in=4, n_features=8, activation="batchtopk")
    # the shared Config.build path gives the same kind of error
    with pytest.raises(RanklensError, match="k=9"):
        SAEConfig.build({"d_in": 4, "n_features": 8, "k": 9})
    assert isinstance(SAEConfig(d_in=4, n_features=8, k=2), Config)


def test_parameters_are_rows_per_feature():
    sae = SparseAutoencoder(d_in=6, n_features=20, activation="jumprelu")
    shapes = {name: tuple(p.shape) for name, p in sae.named_parameters()}
    assert shapes == {"W_E": (20, 6), "b_E": (20,), "W_D": (20, 6), "b_D": (6,), "log_threshold": (20,)}
    assert "log_threshold" not in dict(_sae().named_parameters())
    torch.testing.assert_close(sae.threshold, torch.full((20,), 0.001))
    # constructor init: unit-norm uniform rows, W_E = W_D, zero biases
    torch.testing.assert_close(torch.linalg.vector_norm(sae.W_D, dim=1), torch.ones(20))
    assert torch.equal(sae.W_E, sae.W_D)
    assert not sae.b_E.any() and not sae.b_D.any()


def test_input_dimension_mismatch_names_both_dims():
    sae = _sae()
    with pytest.raises(RanklensError, match=r"last dimension 7 .*expected d_in=12"):
        sae(torch.zeros(3, 7, dtype=torch.float64))
    with pytest.raises(RanklensError, match="floating-point"):
        sae.encode(torch.zeros(3, 12, dtype=torch.int64))
    with pytest.raises(RanklensError, match="k=3 given for activation='relu'"):
        _sae(activation="relu", k=None).encode(torch.zeros(2, 12, dtype=torch.float64), k=3)


# --------------------------------------------------------------------------- TopK forward / backward


def test_topk_sae_forward_backward_equals_dense_reference():
    sae = _randomize_(_sae())
    g = torch.Generator().manual_seed(7)
    x = torch.randn(30, 12, generator=g, dtype=torch.float64)
    x_hat, code = sae(x)
    loss = ((x_hat - x) ** 2).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters()}

    ref = {n: p.detach().clone().requires_grad_(True) for n, p in sae.named_parameters()}
    x_ref, z_ref = dense_topk_sae_reference(x, ref["W_E"], ref["b_E"], ref["W_D"], ref["b_D"], 5)
    ((x_ref - x) ** 2).sum().backward()
    torch.testing.assert_close(x_hat, x_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(code.to_dense(), z_ref, rtol=1e-12, atol=1e-12)
    for name in grads:
        torch.testing.assert_close(grads[name], ref[name].grad, rtol=1e-10, atol=1e-12, msg=name)


def test_topk_sae_x_of_any_leading_shape_and_k_override():
    sae = _randomize_(_sae())
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    x_hat, code = sae(x)
    assert x_hat.shape == x.shape and code.values.shape == (6, 5)
    assert sae.encode(x, k=2).values.shape == (6, 2)
    assert sae.config.k == 5


def test_code_accessors():
    values = torch.tensor([[0.5, 0.0, 2.0], [1.0, 3.0, 0.0]])
    indices = torch.tensor([[1, 4, 7], [0, 1, 9]])
    code = Code(10, values=values, indices=indices)
    assert code.is_sparse and code.n_tokens == 2
    assert code.active_features().tolist() == [0, 1, 7]
    assert float(code.l0) == 2.0
    assert code.feature_counts().tolist() == [1, 2, 0, 0, 0, 0, 0, 1, 0, 0]
    dense = code.to_dense()
    assert dense.shape == (2, 10) and float(dense[0, 7]) == 2.0 and float(dense[1, 9]) == 0.0
    dcode = Code(10, dense=dense)
    assert dcode.active_features().tolist() == [0, 1, 7]
    assert float(dcode.l0) == 2.0
    assert torch.equal(dcode.feature_counts(), code.feature_counts())
    assert torch.equal(_sae().to_dense(code), dense)


def test_apply_b_dec_to_input():
    sae = _randomize_(_sae(apply_b_dec_to_input=True))
    x = torch.randn(4, 12, dtype=torch.float64)
    expected = (x - sae.b_D) @ sae.W_E.T + sae.b_E
    torch.testing.assert_close(sae.pre_activations(x), expected)
    plain = _randomize_(_sae())
    torch.testing.assert_close(plain.pre_activations(x), x @ plain.W_E.T + plain.b_E)


def test_bfloat16_input_with_float32_parameters():
    sae = _randomize_(_sae(dtype="float32"))
    x = torch.randn(16, 12).bfloat16()
    x_hat, code = sae(x)
    assert code.values.dtype == torch.bfloat16 and x_hat.dtype == torch.float32
    ((x_hat - x.float()) ** 2).sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in sae.parameters())
    bf = _randomize_(_sae(dtype="bfloat16"))
    x_hat_b, _ = bf(x)
    assert x_hat_b.dtype == torch.bfloat16


def test_autocast_reaches_the_topk_encoder():
    """autocast skips topk_encode's addmm(out=); the SAE casts x itself, so under autocast the code equals the one
    of a bf16 input (and differs from the float32 code, or the test could not tell the paths apart)."""
    sae = _randomize_(_sae(dtype="float32", n_features=512, d_in=64, k=8), seed=3)
    x = torch.randn(64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = sae.encode(x)
    explicit = sae.encode(x.bfloat16())
    plain = sae.encode(x)
    assert auto.values.dtype == torch.bfloat16
    assert torch.equal(auto.values, explicit.values) and torch.equal(auto.indices, explicit.indices)
    assert not torch.equal(auto.values.float(), plain.values)


# --------------------------------------------------------------------------- other activations


def test_relu_sae_and_decoder_norm_weighted_l1():
    sae = _randomize_(_sae(activation="relu", k=None, l1_coefficient=0.5))
    x = torch.randn(8, 12, dtype=torch.float64)
    x_hat, code = sae(x)
    f = torch.relu(x @ sae.W_E.T + sae.b_E)
    torch.testing.assert_close(code.dense, f)
    torch.testing.assert_close(x_hat, f @ sae.W_D + sae.b_D)
    norms = sae.W_D.detach().norm(dim=1)
    expected = 0.5 * float((f.detach() * norms).sum() / 8)
    assert float(sae.sparsity_penalty(code).detach()) == pytest.approx(expected, rel=1e-12)
    assert float(sae.sparsity_penalty(code, coefficient=2.0).detach()) == pytest.approx(4 * expected, rel=1e-12)


def test_batchtopk_sae():
    sae = _randomize_(_sae(activation="batchtopk", k=3))
    x = torch.randn(10, 12, dtype=torch.float64)
    _, code = sae(x)
    assert int((code.dense != 0).sum()) == 30
    assert float(code.l0) == 3.0
    assert float(sae.sparsity_penalty(code)) == 0.0


def test_jumprelu_sae_forward_and_l0_penalty_gradient():
    sae = _randomize_(_sae(activation="jumprelu", k=None, jumprelu_bandwidth=0.5, l0_coefficient=0.1))
    with torch.no_grad():
        sae.log_threshold.copy_(torch.linspace(-2.0, 0.0, 48, dtype=torch.float64))
    x = torch.randn(40, 12, dtype=torch.float64)
    x_hat, code = sae(x)
    z = torch.relu(x @ sae.W_E.T + sae.b_E).detach()
    theta = sae.log_threshold.exp().detach()
    f = z * (z > theta)
    torch.testing.assert_close(code.dense, f)
    torch.testing.assert_close(x_hat, f @ sae.W_D + sae.b_D)
    penalty = sae.sparsity_penalty(code)
    assert float(penalty.detach()) == pytest.approx(0.1 * float((z > theta).sum()) / 40)
    penalty.backward()
    K = ((z - theta) / 0.5).abs() < 0.5
    d_theta = 0.1 * (-(1 / 0.5) * K.double()).sum(0) / 40  # Eq. 12, averaged over tokens
    torch.testing.assert_close(sae.log_threshold.grad, d_theta * theta)  # chain rule through theta = exp(log theta)
    assert sae.W_E.grad is None or not sae.W_E.grad.any(), "the L0 STE passes no gradient to the pre-activations"


def test_topk_sparsity_penalty_is_zero():
    sae = _sae()
    _, code = sae(torch.randn(3, 12, dtype=torch.float64))
    assert float(sae.sparsity_penalty(code)) == 0.0


def test_decode_rejects_foreign_code():
    sae = _sae()
    with pytest.raises(RanklensError, match="n_features=7"):
        sae.decode(Code(7, dense=torch.zeros(2, 7)))


# --------------------------------------------------------------------------- decoder norm


def test_normalize_decoder_gives_unit_rows():
    sae = _randomize_(_sae(normalize_decoder=True))
    sae.normalize_decoder_()
    torch.testing.assert_close(sae.W_D.norm(dim=1), torch.ones(48, dtype=torch.float64), rtol=1e-14, atol=1e-14)
    bf = _randomize_(_sae(dtype="bfloat16", normalize_decoder=True)).normalize_decoder_()
    assert float((bf.W_D.detach().float().norm(dim=1) - 1).abs().max()) < 1e-2
    fresh = SparseAutoencoder(d_in=5, n_features=9, k=2, normalize_decoder=True)
    assert math.isclose(float(fresh.W_D.detach().norm(dim=1).max()), 1.0, rel_tol=1e-6)
