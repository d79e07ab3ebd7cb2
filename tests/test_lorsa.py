"""Lorsa (Algorithm 1 of the Lorsa paper): the exact MHSA decomposition, a naive per-head reference, z patterns,
footnote-3 normalization, the sparse code, and errors."""

from __future__ import annotations

import dataclasses
import functools
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from ranklens.dictionaries.lorsa import Lorsa, LorsaConfig, LorsaOutput
from ranklens.dictionaries.lorsa_init import exact_from_mhsa, init_default_
from ranklens.errors import RanklensError
from ranklens.lm.attention import RopeSpec, attention_reference, mhsa_weights
from ranklens.lm.capture import capture
from tiny_models import tiny_batch, tiny_model


@functools.cache
def _model(name: str, dtype: torch.dtype = torch.float64):
    return tiny_model(name, dtype=dtype)


def _io(name: str, layer: int, dtype=torch.float64, left_pad: bool = False):
    model = _model(name, dtype)
    ids, mask = tiny_batch(model)
    if left_pad:
        ids, mask = ids.flip(-1), mask.flip(-1)
    acts = capture(model, f"L{layer}.attn_in,L{layer}.attn_out", ids, mask)
    return mhsa_weights(model, layer), acts[f"L{layer}.attn_in"], acts[f"L{layer}.attn_out"], mask


# ---- the exact decomposition ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["llama", "qwen2", "qwen3", "mistral", "gemma", "gpt2", "gpt_neox", "gpt_neox_seq", "bert"]
)
@pytest.mark.parametrize("layer", [2])
def test_exact_decomposition_reproduces_mhsa(name, layer):
    w, x, out, mask = _io(name, layer)
    lorsa = exact_from_mhsa(w)
    c = lorsa.cfg
    assert (c.n_heads, c.n_qk_groups, c.d_qk, c.k) == (
        2 * w.n_heads * w.d_head,
        w.n_heads,
        w.d_head,
        c.n_heads,
    )
    assert lorsa.W_V.dtype == torch.float64
    pred = lorsa(x, mask).out
    # Qwen3's q/k norms run in float32 even in a float64 model; Lorsa's keep float64, hence the looser bound there.
    tol = 1e-7 if name == "qwen3" else 1e-10
    torch.testing.assert_close(pred, out, rtol=tol, atol=tol)


def test_exact_decomposition_gemma2_softcap_sliding_window():
    # Gemma 2: soft-capped logits, query_pre_attn_scalar scale, sliding window on layer 0 (seq 12 > window 8).
    # float32, as the model's eager attention takes its softmax in float32.
    for layer in (0, 1):
        w, x, out, mask = _io("gemma2", layer, torch.float32)
        assert w.softcap is not None
        torch.testing.assert_close(exact_from_mhsa(w)(x, mask).out, out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer, kind", [(0, "sliding_attention"), (1, "full_attention")])
def test_exact_decomposition_gemma3_per_layer_rope(layer, kind):
    # Gemma 3: sliding layers rotate with theta 1e4 inside a window of 8 (seq 12), the global layer with theta 1e6
    # and linear scaling over the whole sequence; q/k norms scale by (1 + w). float32, as the model's eager
    # attention and its RMSNorms compute in float32.
    model = _model("gemma3", torch.float32)
    assert model.config.layer_types[layer] == kind
    w, x, out, mask = _io("gemma3", layer, torch.float32)
    rotary = model.model.rotary_emb
    assert torch.equal(w.positions.inv_freq, getattr(rotary, f"{kind}_inv_freq"))
    assert w.positions.rope_type == rotary.rope_type[kind]
    assert w.sliding_window == (8 if kind == "sliding_attention" else None)
    assert w.q_norm is not None and w.q_norm.offset == 1.0 and w.softcap is None
    lorsa = exact_from_mhsa(w)
    torch.testing.assert_close(lorsa(x, mask).out, out, rtol=1e-5, atol=1e-5)
    # The other layer type's rotation does not reproduce this layer: the per-layer RoPE is what makes it exact.
    other = "full_attention" if kind == "sliding_attention" else "sliding_attention"
    wrong = RopeSpec.from_module(rotary, layer_type=other)
    swapped = exact_from_mhsa(dataclasses.replace(w, positions=wrong))
    assert (swapped(x, mask).out - out).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_exact_decomposition_left_padding(name):
    w, x, out, mask = _io(name, 1, left_pad=True)
    pred = exact_from_mhsa(w)(x, mask).out
    keep = mask.bool()
    torch.testing.assert_close(pred[keep], out[keep], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_exact_decomposition_float32_and_reference(name):
    w, x, out, mask = _io(name, 1, torch.float32)
    lorsa = exact_from_mhsa(w)
    assert lorsa.W_V.dtype == torch.float32
    torch.testing.assert_close(lorsa(x, mask).out, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lorsa(x, mask).out, attention_reference(w, x, mask)[0], rtol=1e-5, atol=1e-5)


# ---- a naive per-head reference -------------------------------------------------------------------------------------


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), -1)


def naive_lorsa(lorsa: Lorsa, x: torch.Tensor, mask: torch.Tensor | None):
    """Algorithm 1 written out head by head: returns (out [B, T, d], dense code [B, T, H], z_pre [B, T, H],
    top-K indices [B, T, K] by z ||w_o||)."""
    c = lorsa.cfg
    B, T, d = x.shape
    H = c.n_heads
    n = H // c.n_qk_groups
    i = torch.arange(T)
    visible = torch.ones(B, T, T, dtype=torch.bool)
    if c.causal:
        visible &= (i[:, None] >= i[None, :])[None]
    if c.sliding_window is not None:
        visible &= (i[:, None] - i[None, :] < c.sliding_window)[None]
    if mask is not None:
        visible &= mask.bool()[:, None, :]
    if c.positions is not None:
        rd = c.positions.rotary_dim
        ang = i[:, None].float() * c.positions.inv_freq[None]  # [T, rd/2]
        ang = torch.cat((ang, ang), -1)
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    z_pre = torch.zeros(B, T, H, dtype=x.dtype)
    for h in range(H):
        g = h // n
        q = x @ lorsa.W_Q[g].T + lorsa.b_Q[g]
        k = x @ lorsa.W_K[g].T + lorsa.b_K[g]
        if c.qk_norm:
            q = lorsa.q_norm_weight[g] * q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + c.qk_norm_eps)
            k = lorsa.k_norm_weight[g] * k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + c.qk_norm_eps)
        if c.positions is not None:
            q = torch.cat((q[..., :rd] * cos + _rotate_half(q[..., :rd]) * sin, q[..., rd:]), -1)
            k = torch.cat((k[..., :rd] * cos + _rotate_half(k[..., :rd]) * sin, k[..., rd:]), -1)
        v = x @ lorsa.W_V[h] + (lorsa.b_V[h] if lorsa.b_V is not None else 0)  # [B, T]
        s = q @ k.transpose(-1, -2) * c.attn_scale
        if c.softcap is not None:
            s = c.softcap * torch.tanh(s / c.softcap)
        a = torch.softmax(s.masked_fill(~visible, -math.inf), -1).nan_to_num(0.0)
        z_pre[..., h] = (a @ v[..., None])[..., 0]
    z = torch.relu(z_pre)
    score = z * lorsa.W_O.norm(dim=1)
    _, idx = score.topk(c.k, dim=-1)
    code = torch.zeros_like(z).scatter(-1, idx, z.gather(-1, idx))
    out = code @ lorsa.W_O
    if lorsa.b_O is not None:
        out = out + lorsa.b_O
    return out, code, z_pre, idx


def _random_lorsa(seed=0, **cfg) -> Lorsa:
    base = dict(d_model=64, n_heads=48, n_qk_groups=6, d_qk=16, k=7, dtype=torch.float64)
    base.update(cfg)
    lorsa = Lorsa(LorsaConfig(**base))
    g = torch.Generator().manual_seed(seed)
    init_default_(lorsa, g)
    with torch.no_grad():
        for p in (lorsa.b_Q, lorsa.b_K, lorsa.b_V, lorsa.b_O):
            if p is not None:
                p.normal_(0, 0.3, generator=g)
        lorsa.W_O.mul_(torch.rand(lorsa.cfg.n_heads, 1, generator=g, dtype=torch.float64) + 0.5)
        if lorsa.q_norm_weight is not None:
            lorsa.q_norm_weight.uniform_(0.5, 1.5, generator=g)
            lorsa.k_norm_weight.uniform_(0.5, 1.5, generator=g)
    return lorsa


def _x(B=3, T=10, d=64, seed=1):
    return torch.randn(B, T, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _mask(B=3, T=10):
    m = torch.ones(B, T, dtype=torch.long)
    m[1, 7:] = 0
    m[2, 4:] = 0
    return m


def _rope() -> RopeSpec:
    return mhsa_weights(_model("llama"), 0).positions


VARIANTS = {
    "causal_rope": dict(positions="rope"),
    "bidirectional": dict(causal=False),
    "partial_rope_qknorm_window": dict(positions="partial", qk_norm=True, sliding_window=4),
    "softcap_no_biases": dict(positions="rope", softcap=5.0, use_value_bias=False, use_output_bias=False),
    "chunked_groups": dict(positions="rope", group_chunk=4),
}


def _variant(name: str) -> Lorsa:
    cfg = dict(VARIANTS[name])
    pos = cfg.pop("positions", None)
    if pos == "rope":
        cfg["positions"] = _rope()
    elif pos == "partial":
        cfg["positions"] = mhsa_weights(_model("gpt_neox"), 0).positions  # rotary_dim 4 of d_qk 16
    return _random_lorsa(**cfg)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_matches_naive_per_head_loop(variant):
    lorsa = _variant(variant)
    x, mask = _x(), _mask()
    out = lorsa(x, mask)
    ref_out, ref_code, ref_z, ref_idx = naive_lorsa(lorsa, x, mask)
    torch.testing.assert_close(lorsa.z_pre(x, mask), ref_z, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.dense(lorsa.n_heads), ref_code, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.out, ref_out, rtol=1e-10, atol=1e-10)
    # Indices agree wherever the value is nonzero (ties at zero may be broken differently).
    live = out.values > 0
    assert torch.equal(out.indices[live], ref_idx[live])
    assert out.values.shape == out.indices.shape == (3, 10, lorsa.cfg.k)
    assert (out.values >= 0).all()


def test_one_sdpa_call_for_all_groups():
    lorsa = _variant("causal_rope")
    x, mask = _x(), _mask()
    with mock.patch.object(F, "scaled_dot_product_attention", wraps=F.scaled_dot_product_attention) as sdpa:
        lorsa(x, mask)
    assert sdpa.call_count == 1
    q, k, v = sdpa.call_args.args[:3]
    assert q.shape == k.shape == (3, 6, 10, 16)  # [B, G, T, d_qk]
    assert v.shape == (3, 6, 10, 8)  # [B, G, T, H/G]: the group's heads' scalar values as the value dim

    chunked = _variant("chunked_groups")  # G = 6 in chunks of 4: two calls
    with mock.patch.object(F, "scaled_dot_product_attention", wraps=F.scaled_dot_product_attention) as sdpa:
        chunked(x, mask)
    assert sdpa.call_count == 2


@pytest.mark.parametrize("k", [7, 20])  # k=20 exceeds one group's 8 heads: the running top-K spans chunks
def test_chunked_groups_equal_unchunked(k):
    a = _random_lorsa(positions=_rope(), k=k)
    b = _random_lorsa(positions=_rope(), k=k, group_chunk=1)
    x, mask = _x(), _mask()
    oa, ob = a(x, mask), b(x, mask)
    torch.testing.assert_close(oa.out, ob.out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(oa.dense(48), ob.dense(48), rtol=1e-12, atol=1e-12)


def test_backward_reaches_every_parameter_and_only_selected_output_rows():
    lorsa = _random_lorsa(positions=_rope(), qk_norm=True)
    x, mask = _x(), _mask()
    out = lorsa(x, mask)
    out.out.pow(2).sum().backward()
    for name, p in lorsa.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    selected = torch.zeros(lorsa.n_heads, dtype=torch.bool)
    selected[out.indices[out.values > 0]] = True
    assert (lorsa.W_O.grad[~selected] == 0).all()


def test_inference_mode_activations_are_accepted():
    lorsa = _random_lorsa()
    with torch.inference_mode():
        x = _x()
    lorsa(x).out.sum().backward()
    assert lorsa.W_V.grad is not None


# ---- z patterns, normalization, active heads -----------------------------------------------------------------------


def test_z_pattern_sums_to_z():
    lorsa = _variant("partial_rope_qknorm_window")
    x, mask = _x(), _mask()
    z = lorsa.z_pre(x, mask)
    for head in (0, 13, 47):
        pat = lorsa.z_pattern(x, head, mask)
        assert pat.shape == (3, 10, 10)
        torch.testing.assert_close(pat.sum(-1), z[..., head], rtol=1e-10, atol=1e-10)
        assert (pat.triu(1) == 0).all()  # causal: no contribution from later tokens
        assert (pat[1, :, 7:] == 0).all()  # nor from padding
        assert (pat.tril(-4) == 0).all()  # nor from outside the sliding window
    single = lorsa.z_pattern(x[0], 5)
    torch.testing.assert_close(single, lorsa.z_pattern(x[:1], 5)[0])


@pytest.mark.parametrize("variant", ["partial_rope_qknorm_window", "bidirectional"])
def test_z_rows_equal_rows_of_the_z_pattern(variant):
    lorsa = _variant(variant) if variant != "bidirectional" else _random_lorsa(causal=False)
    x = _x()[0]
    heads = torch.tensor([0, 13, 13, 47, 5, 0])
    queries = torch.tensor([9, 3, 9, 0, 6, 2])
    rows = lorsa.z_rows(x, heads, queries)
    for m in range(heads.numel()):
        expected = lorsa.z_pattern(x, int(heads[m]))[int(queries[m])]
        torch.testing.assert_close(rows[m], expected, rtol=1e-12, atol=1e-12)


def test_normalize_output_keeps_predictions():
    lorsa = _random_lorsa(positions=_rope())
    x, mask = _x(), _mask()
    before = lorsa(x, mask)
    assert not torch.allclose(lorsa.W_O.norm(dim=1), torch.ones(48, dtype=torch.float64))
    lorsa.normalize_output_()
    after = lorsa(x, mask)
    torch.testing.assert_close(lorsa.W_O.norm(dim=1), torch.ones(48, dtype=torch.float64))
    torch.testing.assert_close(after.out, before.out, rtol=1e-10, atol=1e-10)
    live = before.values > 0
    assert torch.equal(after.indices[live], before.indices[live])


def test_active_heads_ignore_padding():
    lorsa = _random_lorsa(k=2)
    x, mask = _x(), _mask()
    out = lorsa(x, mask)
    assert isinstance(out, LorsaOutput)
    live = (out.values > 0) & mask.bool()[..., None]
    assert torch.equal(out.active_heads(), torch.unique(out.indices[live]))
    only_pad = LorsaOutput(out.out, out.values, out.indices, torch.zeros_like(mask))
    assert only_pad.active_heads().numel() == 0


def test_config_roundtrip():
    cfg = LorsaConfig(d_model=64, n_heads=32, n_qk_groups=4, d_qk=16, k=4, positions=_rope(), qk_norm=True)
    back = LorsaConfig.from_dict(cfg.to_dict())
    assert back.to_dict() == cfg.to_dict() and back.positions.inv_freq.equal(cfg.positions.inv_freq)
    assert cfg.heads_per_group == 8 and cfg.attn_scale == 0.25


# ---- errors ---------------------------------------------------------------------------------------------------------


def test_config_errors():
    base = dict(d_model=64, n_heads=48, n_qk_groups=6, d_qk=16, k=4)
    with pytest.raises(RanklensError, match="not divisible by n_qk_groups 5"):
        LorsaConfig(**{**base, "n_qk_groups": 5})
    with pytest.raises(RanklensError, match="k=49 exceeds n_heads=48"):
        LorsaConfig(**{**base, "k": 49})
    with pytest.raises(RanklensError, match="d_qk=0"):
        LorsaConfig(**{**base, "d_qk": 0})
    with pytest.raises(RanklensError, match="rotary_dim 16 exceeds d_qk 8"):
        LorsaConfig(**{**base, "d_qk": 8, "positions": _rope()})
    with pytest.raises(RanklensError, match="scale"):
        LorsaConfig(**{**base, "scale": -1.0})


def test_forward_errors():
    lorsa = _random_lorsa()
    with pytest.raises(RanklensError, match="d_model=64"):
        lorsa(torch.zeros(2, 5, 32, dtype=torch.float64))
    with pytest.raises(RanklensError, match="attention_mask"):
        lorsa(torch.zeros(2, 5, 64), torch.ones(2, 6))
    with pytest.raises(RanklensError, match="head 48"):
        lorsa.z_pattern(torch.zeros(2, 5, 64), 48)


def test_dtype_follows_the_parameters():
    lorsa = _random_lorsa(dtype=torch.float32, positions=_rope())
    x = _x()  # float64 input is cast to the parameters' dtype
    assert lorsa(x).out.dtype == torch.float32
    lorsa.double()
    torch.testing.assert_close(lorsa(x).out, naive_lorsa(lorsa, x, None)[0], rtol=1e-10, atol=1e-10)


# ---- the causal fast path and the pre-activations kept for AuxK -----------------------------------------------------


def test_causal_without_mask_uses_is_causal_and_matches_the_explicit_mask():
    lorsa = _variant("causal_rope")
    x = _x()
    ones = torch.ones(3, 10, dtype=torch.long)
    with mock.patch.object(F, "scaled_dot_product_attention", wraps=F.scaled_dot_product_attention) as sdpa:
        fast = lorsa(x)
    assert sdpa.call_args.kwargs["is_causal"] is True and "attn_mask" not in sdpa.call_args.kwargs
    explicit = lorsa(x, ones)
    ref_out, ref_code, _, _ = naive_lorsa(lorsa, x, None)
    torch.testing.assert_close(fast.out, explicit.out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fast.dense(lorsa.n_heads), ref_code, rtol=1e-10, atol=1e-10)


def test_right_padding_needs_no_mask_at_real_positions_of_a_causal_lorsa():
    """With right padding a causal query never sees a padded key, so the fast path is exact at real positions."""
    lorsa = _variant("causal_rope")
    x, mask = _x(), _mask()
    real = mask.bool()
    torch.testing.assert_close(lorsa(x).out[real], lorsa(x, mask).out[real], rtol=1e-12, atol=1e-12)


def test_encode_with_pre_matches_encode_and_z_pre():
    lorsa = _variant("chunked_groups")
    x, mask = _x(), _mask()
    values, indices, pre = lorsa.encode_with_pre(x, mask)
    v2, i2 = lorsa.encode(x, mask)
    assert torch.equal(values, v2) and torch.equal(indices, i2)
    torch.testing.assert_close(pre, lorsa.z_pre(x, mask), rtol=0, atol=0)
    assert pre.requires_grad


# ---- the site Lorsa reads -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma2", "gpt2", "gpt_neox", "bert"])
def test_attn_in_is_exactly_what_the_attention_module_reads(name):
    """`attn_in` (after the norm; BERT: the block input) is the hidden_states the attention module is called with."""
    model = _model(name, torch.float32)
    ids, mask = tiny_batch(model)
    arch_layers = {"llama": lambda m: m.model.layers[1].self_attn, "qwen3": lambda m: m.model.layers[1].self_attn,
                   "gemma2": lambda m: m.model.layers[1].self_attn, "gpt2": lambda m: m.transformer.h[1].attn,
                   "gpt_neox": lambda m: m.gpt_neox.layers[1].attention,
                   "bert": lambda m: m.encoder.layer[1].attention}
    seen = {}

    def pre_hook(module, args, kwargs):
        seen["x"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    handle = arch_layers[name](model).register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        handle.remove()
    assert torch.equal(capture(model, "L1.attn_in", ids, mask)["L1.attn_in"], seen["x"])


def test_a_qk_dimension_below_the_rotary_one_rotates_like_a_smaller_head():
    """App. B.1 on a fully rotating model: d_qk = D / r keeps every r-th frequency, the RoPE of a head of d_qk dims."""
    model = tiny_model("llama")
    w = mhsa_weights(model, 1)
    D = w.positions.rotary_dim
    cfg = LorsaConfig.from_mhsa(w, n_heads=8, n_qk_groups=2, k=2, d_qk=D // 2)
    theta = model.config.rope_parameters["rope_theta"]
    expected = theta ** (-torch.arange(0, D // 2, 2, dtype=torch.float64) / (D // 2))
    torch.testing.assert_close(cfg.positions.inv_freq.double(), expected, rtol=1e-6, atol=0)
    assert LorsaConfig.from_mhsa(w, n_heads=8, n_qk_groups=2, k=2).positions is w.positions
    with pytest.raises(RanklensError, match="even divisor"):
        LorsaConfig.from_mhsa(w, n_heads=8, n_qk_groups=2, k=2, d_qk=3)
