"""Site names and patterns, and the per-family architecture description."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ranklens.errors import RanklensError
from ranklens.lm.sites import KINDS, SUPPORTED_MODEL_TYPES, Site, describe, parse_sites, per_head_outputs
from tiny_models import NAMES, tiny_model

EXPECTED_FAMILY = {
    "llama": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "mistral": "llama",
    "gemma": "llama",
    "gemma2": "llama",
    "gemma3": "llama",
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
    "gpt_neox_seq": "gpt_neox",
    "bert": "bert",
    "bert_mlm": "bert",
}


@functools.cache
def _model(name: str):
    return tiny_model(name)


# ---- Site ----------------------------------------------------------------------------------------------------------


def test_site_name_and_parse_roundtrip():
    s = Site(15, "attn_out")
    assert s.name == "L15.attn_out" == str(s)
    assert Site.parse("L15.attn_out") == s
    assert Site.parse(" L0.resid_pre ") == Site(0, "resid_pre")
    assert hash(Site.parse("L3.mlp_out")) == hash(Site(3, "mlp_out"))


def test_site_orders_by_layer_then_forward_order_of_kinds():
    shuffled = [
        Site(1, "attn_in"),
        Site(0, "resid_post"),
        Site(0, "attn_z"),
        Site(1, "resid_pre"),
        Site(0, "mlp_out"),
    ]
    assert [s.name for s in sorted(shuffled)] == [
        "L0.attn_z",
        "L0.mlp_out",
        "L0.resid_post",
        "L1.resid_pre",
        "L1.attn_in",
    ]
    assert sorted(Site(0, k) for k in reversed(KINDS)) == [Site(0, k) for k in KINDS]


@pytest.mark.parametrize(
    "bad", ["15.attn_out", "L15", "L15.attn_outt", "Lx.attn_out", "L*.attn_out", "L1-2.attn_out", ""]
)
def test_site_parse_rejects(bad):
    with pytest.raises(RanklensError):
        Site.parse(bad)


def test_site_constructor_validates():
    with pytest.raises(RanklensError, match="unknown site kind 'bogus'"):
        Site(0, "bogus")
    with pytest.raises(RanklensError, match="non-negative"):
        Site(-1, "attn_out")


# ---- parse_sites ---------------------------------------------------------------------------------------------------


def test_parse_single_and_wildcards():
    assert parse_sites("L2.attn_out", 4) == [Site(2, "attn_out")]
    assert parse_sites("L*.attn_out", 3) == [Site(i, "attn_out") for i in range(3)]
    assert parse_sites("L1.*", 3) == [Site(1, k) for k in KINDS]
    assert parse_sites("L*.*", 2) == [Site(i, k) for i in range(2) for k in KINDS]


def test_parse_mid_is_the_middle_layer():
    assert parse_sites("Lmid.attn_out", 30) == [Site(15, "attn_out")]
    assert parse_sites("Lmid.attn_out", 6) == [Site(3, "attn_out")]
    assert parse_sites("Lmid.attn_out", 1) == [Site(0, "attn_out")]


def test_parse_range_is_inclusive():
    assert parse_sites("L10-12.mlp_out", 24) == [
        Site(10, "mlp_out"),
        Site(11, "mlp_out"),
        Site(12, "mlp_out"),
    ]
    assert parse_sites("L3-3.mlp_out", 4) == [Site(3, "mlp_out")]


def test_parse_many_sorted_and_deduplicated():
    got = parse_sites(" L1.resid_post , L0-1.attn_out,L1.attn_out,L*.attn_in, L0.attn_out", 2)
    assert [s.name for s in got] == [
        "L0.attn_in",
        "L0.attn_out",
        "L1.attn_in",
        "L1.attn_out",
        "L1.resid_post",
    ]


def test_parse_unknown_kind_lists_valid_kinds():
    with pytest.raises(RanklensError, match="unknown site kind 'attn_output'") as e:
        parse_sites("L1.attn_output", 4)
    assert all(k in str(e.value) for k in KINDS)


@pytest.mark.parametrize(
    "pattern, bad", [("L4.attn_out", "4"), ("L2-7.mlp_out", "7"), ("L0.attn_out,L9.*", "9")]
)
def test_parse_layer_out_of_range(pattern, bad):
    with pytest.raises(RanklensError, match=rf"layer {bad} .* has 4 layers \(valid 0\.\.3\)"):
        parse_sites(pattern, 4)


@pytest.mark.parametrize(
    "pattern",
    [
        "attn_out",
        "L.attn_out",
        "Lx.attn_out",
        "L1..attn_out",
        "L1-.attn_out",
        "L-1.attn_out",
        "L1,2.attn_out",
        "l1.attn_out",
        "L1.attn_out,",
        "L1-2-3.mlp_out",
        "L1:3.mlp_out",
        "L1.attn-out",
        "L1.attn_out.x",
    ],
)
def test_parse_malformed_shows_syntax(pattern):
    with pytest.raises(RanklensError, match=r"malformed site pattern .*; expected L\{layer\}\.\{kind\}"):
        parse_sites(pattern, 4)


def test_parse_malformed_message_has_syntax():
    with pytest.raises(
        RanklensError, match=r"malformed site pattern 'L1:3\.mlp_out'; expected L\{layer\}\.\{kind\}"
    ):
        parse_sites("L1:3.mlp_out", 4)


def test_parse_brace_kind_is_rejected():
    with pytest.raises(RanklensError, match="malformed site pattern 'L1.{attn_out'"):
        parse_sites("L1.{attn_out,mlp_out}", 4)


def test_parse_empty_and_reversed_range_and_bad_n_layers():
    with pytest.raises(RanklensError, match="empty site pattern"):
        parse_sites("  ", 4)
    with pytest.raises(RanklensError, match="range 3-1 .* start <= end"):
        parse_sites("L3-1.attn_out", 4)
    with pytest.raises(RanklensError, match="n_layers 0"):
        parse_sites("L0.attn_out", 0)


# ---- describe ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_describe_dimensions(name):
    model = _model(name)
    arch = describe(model)
    cfg = model.config
    assert arch.family == EXPECTED_FAMILY[name]
    assert arch.model_type == cfg.model_type
    assert arch.causal == (arch.family != "bert")
    assert arch.n_layers == cfg.num_hidden_layers == len(arch.layers)
    assert arch.d_model == cfg.hidden_size
    assert arch.n_heads == cfg.num_attention_heads
    assert arch.n_kv_heads == (2 if arch.family == "llama" else arch.n_heads)
    assert arch.d_head == (24 if name == "qwen3" else 16)
    expected_mlp = {"llama": 96, "gpt2": 4 * 64, "gpt_neox": 128, "bert": 128}[arch.family]
    assert arch.d_mlp == expected_mlp
    assert arch.parallel_residual == (name == "gpt_neox")
    norm_attr = {"llama": "norm", "gpt2": "ln_f", "gpt_neox": "final_layer_norm", "bert": None}[arch.family]
    assert arch.final_norm is (None if norm_attr is None else getattr(arch.base_model, norm_attr))
    # base_model is the bare model holding the layers
    assert any(m is arch.layers for m in arch.base_model.modules())
    sites = arch.sites()
    assert len(sites) == arch.n_layers * len(KINDS)
    assert [s for s, _ in sites] == sorted(s for s, _ in sites)
    for site, dim in sites:
        assert dim == {"attn_z": arch.n_heads * arch.d_head, "mlp_hidden": arch.d_mlp}.get(
            site.kind, arch.d_model
        )
        module, point = arch.hook_point(site)
        assert point in ("input", "output")
        assert any(module is m for m in arch.layers[site.layer].modules())


def test_qwen3_attn_z_is_wider_than_d_model():
    arch = describe(_model("qwen3"))
    assert arch.site_dim(Site(0, "attn_z")) == 96 != arch.d_model


@pytest.mark.parametrize("wrapped, bare", [("bert_mlm", "bert")])
def test_describe_wrapper_and_bare_model_agree(wrapped, bare):
    a, b = describe(_model(wrapped)), describe(_model(bare))
    assert (a.family, a.n_layers, a.d_model, a.d_mlp) == (b.family, b.n_layers, b.d_model, b.d_mlp)
    llama = _model("llama")
    assert describe(llama.model).layers is describe(llama).layers
    assert describe(llama).base_model is llama.model


def test_describe_hook_points_by_family():
    llama = describe(_model("llama"))
    blk = llama.layers[1]
    assert llama.hook_point(Site(1, "resid_pre")) == (blk, "input")
    assert llama.hook_point(Site(1, "attn_z")) == (blk.self_attn.o_proj, "input")
    assert llama.hook_point(Site(1, "mlp_in")) == (blk.post_attention_layernorm, "output")
    gemma = describe(_model("gemma2"))
    assert gemma.hook_point(Site(0, "mlp_in"))[0] is gemma.layers[0].pre_feedforward_layernorm
    assert gemma.hook_point(Site(0, "attn_out"))[0] is gemma.layers[0].self_attn.o_proj
    bert = describe(_model("bert"))
    assert (
        bert.hook_point(Site(0, "attn_in"))
        == bert.hook_point(Site(0, "resid_pre"))
        == (bert.layers[0], "input")
    )
    assert bert.hook_point(Site(0, "mlp_out")) == (bert.layers[0].output.dense, "output")
    gpt2 = describe(_model("gpt2"))
    assert gpt2.hook_point(Site(2, "mlp_hidden")) == (gpt2.layers[2].mlp.c_proj, "input")


def test_hook_point_out_of_range():
    with pytest.raises(
        RanklensError, match=r"L3\.attn_out is out of range: the model has 3 layers \(valid 0\.\.2\)"
    ):
        describe(_model("llama")).hook_point(Site(3, "attn_out"))


def test_describe_unsupported_model_type():
    fake = nn.Module()
    fake.config = SimpleNamespace(model_type="mamba")
    with pytest.raises(RanklensError, match="unsupported model_type 'mamba'") as e:
        describe(fake)
    assert all(t in str(e.value) for t in SUPPORTED_MODEL_TYPES)
    with pytest.raises(RanklensError, match="no config.model_type"):
        describe(nn.Linear(2, 2))


# ---- output projection and per-head outputs ------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_output_projection_is_linear_layout(name):
    arch = describe(_model(name))
    for layer in range(arch.n_layers):
        W_O, b_O = arch.output_projection(layer)
        assert W_O.shape == (arch.d_model, arch.n_heads * arch.d_head)
        assert b_O is None or b_O.shape == (arch.d_model,)
        proj, _ = arch.hook_point(Site(layer, "attn_out"))
        z = torch.randn(2, 5, arch.n_heads * arch.d_head)
        with torch.no_grad():
            torch.testing.assert_close(proj(z), z @ W_O.T + (0 if b_O is None else b_O), rtol=1e-5, atol=1e-6)


def test_gpt2_output_projection_is_transposed_conv1d():
    arch = describe(_model("gpt2"))
    W_O, b_O = arch.output_projection(1)
    c_proj = arch.layers[1].attn.c_proj
    assert torch.equal(W_O, c_proj.weight.T) and b_O is c_proj.bias


def test_per_head_outputs_matches_explicit_loop():
    g = torch.Generator().manual_seed(0)
    n_heads, d_head, d_model = 3, 5, 7
    z = torch.randn(2, 4, n_heads * d_head, generator=g, dtype=torch.float64)
    W_O = torch.randn(d_model, n_heads * d_head, generator=g, dtype=torch.float64)
    heads = per_head_outputs(z, W_O, n_heads)
    assert heads.shape == (2, 4, n_heads, d_model)
    for i in range(n_heads):
        sl = slice(i * d_head, (i + 1) * d_head)
        torch.testing.assert_close(heads[..., i, :], z[..., sl] @ W_O[:, sl].T)
    torch.testing.assert_close(heads.sum(-2), z @ W_O.T)


def test_per_head_outputs_errors():
    with pytest.raises(RanklensError, match=r"W_O shape \(7, 14\) does not match attn_z width 15"):
        per_head_outputs(torch.zeros(2, 15), torch.zeros(7, 14), 3)
    with pytest.raises(RanklensError, match="n_heads 4 does not divide attn_z width 15"):
        per_head_outputs(torch.zeros(2, 15), torch.zeros(7, 15), 4)


def test_architecture_site_takes_one_site_with_every_alias():
    arch = describe(tiny_model("llama"))
    mid = arch.n_layers // 2
    assert arch.site("Lmid.attn_out") == Site(mid, "attn_out") == arch.site(f"L{mid}.attn_out")
    with pytest.raises(RanklensError, match="names 2 sites; expected exactly one"):
        arch.site("L0-1.attn_out")
    with pytest.raises(RanklensError, match="out of range"):
        arch.site(f"L{arch.n_layers}.attn_out")
