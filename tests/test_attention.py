"""MHSAWeights and the naive per-head attention reference against each model's own attention module."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ranklens.errors import RanklensError
from ranklens.lm.attention import (
    MHSAWeights,
    RopeSpec,
    attention_allowed,
    attention_reference,
    mhsa_weights,
)
from ranklens.lm.capture import capture
from tiny_models import _COMMON, _ROPE, N_LAYERS, NAMES, tiny_batch, tiny_model

F32 = dict(rtol=1e-5, atol=1e-5)
F64 = dict(rtol=1e-10, atol=1e-10)


@functools.cache
def _model(name: str, dtype: torch.dtype = torch.float32):
    return tiny_model(name, dtype=dtype)


def _sites(model, layer: int, ids, mask):
    acts = capture(model, f"L{layer}.attn_in,L{layer}.attn_z,L{layer}.attn_out", ids, mask)
    return acts[f"L{layer}.attn_in"], acts[f"L{layer}.attn_z"], acts[f"L{layer}.attn_out"]


@pytest.mark.parametrize("name", NAMES)
def test_reference_matches_captured_attention_float32(name):
    model = _model(name)
    ids, mask = tiny_batch(model)  # right padding in the last row
    for layer in range(N_LAYERS):
        x, z, out = _sites(model, layer, ids, mask)
        w = mhsa_weights(model, layer)
        ref_out, ref_z = attention_reference(w, x, mask)
        torch.testing.assert_close(ref_z, z, **F32)
        torch.testing.assert_close(ref_out, out, **F32)


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "mistral", "gpt2", "gpt_neox", "bert"])
def test_reference_matches_captured_attention_float64(name):
    # Not Gemma 2: its eager attention takes the softmax in float32 even for float64 models (agrees to ~1e-7 only).
    model = _model(name, torch.float64)
    ids, mask = tiny_batch(model)
    x, z, out = _sites(model, 1, ids, mask)
    ref_out, ref_z = attention_reference(mhsa_weights(model, 1), x, mask)
    torch.testing.assert_close(ref_z, z, **F64)
    torch.testing.assert_close(ref_out, out, **F64)


@pytest.mark.parametrize("name", ["llama", "gpt2", "gpt_neox", "bert", "qwen3"])
def test_reference_with_left_padding(name):
    model = _model(name, torch.float64)
    ids, mask = tiny_batch(model)
    ids, mask = ids.flip(-1), mask.flip(-1)  # padding at the start of the last row
    x, z, out = _sites(model, 2, ids, mask)
    ref_out, ref_z = attention_reference(mhsa_weights(model, 2), x, mask)
    keep = mask.bool()
    torch.testing.assert_close(ref_out[keep], out[keep], **F64)
    torch.testing.assert_close(ref_z[keep], z[keep], **F64)


def test_reference_without_mask_equals_all_ones_mask():
    model = _model("llama")
    ids, _ = tiny_batch(model, pad=0)
    x, z, out = _sites(model, 0, ids, None)
    w = mhsa_weights(model, 0)
    ref_out, _ = attention_reference(w, x)
    torch.testing.assert_close(ref_out, out, **F32)
    torch.testing.assert_close(attention_reference(w, x, torch.ones(ids.shape, dtype=torch.long))[0], ref_out)


@pytest.mark.parametrize(
    "rope",
    [
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16},
    ],
    ids=lambda r: r["rope_type"],
)
def test_reference_with_rope_scaling(rope):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(
            LlamaConfig(**_COMMON, **_ROPE, num_key_value_heads=2, rope_parameters=rope)
        ).eval()
    ids, mask = tiny_batch(model, seq=20)
    x, z, out = _sites(model, 1, ids, mask)
    w = mhsa_weights(model, 1)
    assert w.positions.rope_type == rope["rope_type"]
    ref_out, ref_z = attention_reference(w, x, mask)
    torch.testing.assert_close(ref_z, z, **F32)
    torch.testing.assert_close(ref_out, out, **F32)


def test_dynamic_rope_is_rejected():
    with torch.random.fork_rng(devices=[]):
        model = LlamaForCausalLM(
            LlamaConfig(
                **_COMMON,
                **_ROPE,
                num_key_value_heads=2,
                rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
            )
        )
    with pytest.raises(RanklensError, match="dynamic"):
        mhsa_weights(model, 0)


def test_rope_spec_reproduces_the_rotary_module():
    model = _model("gpt_neox")
    rot = model.gpt_neox.rotary_emb
    spec = RopeSpec.from_module(rot)
    pos = torch.arange(10)[None]
    x = torch.zeros(1, 10, 64)
    cos, sin = rot(x, pos)
    cos2, sin2 = spec.cos_sin(pos, torch.float32)
    assert torch.equal(cos, cos2) and torch.equal(sin, sin2)
    assert spec.rotary_dim == 4  # partial_rotary_factor 0.25 of d_head 16
    assert RopeSpec.from_dict(spec.to_dict()).inv_freq.equal(spec.inv_freq)


def test_weights_layout_per_family():
    w = mhsa_weights(_model("llama"), 0)  # GQA: 4 query heads, 2 KV heads
    assert (w.n_heads, w.n_kv_heads, w.d_head, w.d_model) == (4, 2, 16, 64)
    assert w.W_Q.shape == (4, 16, 64) and w.W_K.shape == (2, 16, 64) and w.W_V.shape == (2, 16, 64)
    assert w.W_O.shape == (64, 64) and w.b_Q is None and w.b_O is None
    assert [w.kv_group(h) for h in range(4)] == [0, 0, 1, 1]
    assert w.causal and w.positions is not None and w.positions.rotary_dim == 16 and w.scale == 16**-0.5

    q2 = mhsa_weights(_model("qwen2"), 0)
    assert q2.b_Q is not None and q2.b_K is not None and q2.b_V is not None and q2.b_O is None

    q3 = mhsa_weights(_model("qwen3"), 0)
    assert q3.q_norm is not None and q3.k_norm is not None and q3.d_head == 24 and q3.W_O.shape == (64, 96)

    assert mhsa_weights(_model("mistral"), 0).sliding_window == 8
    g2 = [mhsa_weights(_model("gemma2"), layer) for layer in range(3)]
    assert [g.sliding_window for g in g2] == [8, None, 8]  # alternating sliding / full attention layers
    assert g2[0].softcap == 50.0 and g2[0].scale == _model("gemma2").config.query_pre_attn_scalar ** -0.5

    gpt2 = mhsa_weights(_model("gpt2"), 0)
    assert gpt2.positions is None and gpt2.causal and gpt2.b_Q is not None
    bert = mhsa_weights(_model("bert"), 0)
    assert bert.positions is None and not bert.causal

    # GPT-2 Conv1D split: the first head's query is the first d_head columns of c_attn's weight.
    c_attn = _model("gpt2").transformer.h[0].attn.c_attn
    torch.testing.assert_close(gpt2.W_Q[0], c_attn.weight[:, :16].T)
    torch.testing.assert_close(gpt2.W_V[3], c_attn.weight[:, 128 + 48 : 128 + 64].T)
    # GPT-NeoX fused per-head layout: rows [h*3*dh, h*3*dh + dh) are head h's query.
    neox = mhsa_weights(_model("gpt_neox"), 0)
    qkv = _model("gpt_neox").gpt_neox.layers[0].attention.query_key_value.weight
    torch.testing.assert_close(neox.W_K[1], qkv[48 + 16 : 48 + 32])


def test_weights_are_copies():
    model = _model("llama")
    w = mhsa_weights(model, 0)
    w.W_Q.zero_()
    assert model.model.layers[0].self_attn.q_proj.weight.abs().sum() > 0


def test_attention_allowed():
    mask = torch.tensor([[1, 1, 1, 0]])
    a = attention_allowed(4, mask, causal=True, sliding_window=2)
    expect = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0]], dtype=torch.bool)
    assert torch.equal(a[0], expect)
    assert attention_allowed(4, None, causal=False) is None


def test_errors():
    model = _model("llama")
    w = mhsa_weights(model, 0)
    with pytest.raises(RanklensError, match="layer 3"):
        mhsa_weights(model, 3)
    with pytest.raises(RanklensError, match=r"d_model=64"):
        attention_reference(w, torch.zeros(2, 5, 32))
    with pytest.raises(RanklensError, match="attention_mask"):
        attention_reference(w, torch.zeros(2, 5, 64), torch.ones(2, 4))
    with pytest.raises(RanklensError, match="head 4"):
        w.kv_group(4)
    with pytest.raises(RanklensError, match="W_K has shape"):
        MHSAWeights(**{**w.__dict__, "W_K": torch.zeros(3, 16, 64)})
