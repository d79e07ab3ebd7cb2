"""Capture against each model's own arithmetic, early stop, padding, hook hygiene, dtypes, truncated forward."""

from __future__ import annotations

import functools

import pytest
import torch

from ranklens.errors import RanklensError
from ranklens.lm.capture import Capturer, capture, truncated_forward
from ranklens.lm.sites import KINDS, Architecture, Site, describe, per_head_outputs
from tiny_models import NAMES, tiny_batch, tiny_model

TOL = dict(rtol=1e-5, atol=1e-5)


@functools.cache
def _model(name: str):
    return tiny_model(name)


@functools.cache
def _full(name: str) -> dict[str, torch.Tensor]:
    """All sites of all layers, captured in one pass on the padded tiny batch."""
    model = _model(name)
    ids, mask = tiny_batch(model)
    return Capturer(model, "L*.*")(ids, mask)


def close(actual, expected, **tol):
    torch.testing.assert_close(actual, expected, **(tol or TOL))


def _count_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ---- the model's own arithmetic ------------------------------------------------------------------------------------


def _v_at_first_position(arch: Architecture, block, attn_in: torch.Tensor) -> torch.Tensor:
    """Per-head value vectors of token 0 ([batch, n_heads, d_head]), expanded over GQA groups. In a causal model,
    token 0 attends only to itself, so Z_h at position 0 is exactly V_h of token 0: checks attn_z's head layout."""
    x = attn_in[:, :1]
    H, dh = arch.n_heads, arch.d_head
    if arch.family == "llama":
        v = block.self_attn.v_proj(x).view(x.shape[0], arch.n_kv_heads, dh)
        return v.repeat_interleave(H // arch.n_kv_heads, dim=1)
    if arch.family == "gpt2":
        return block.attn.c_attn(x)[..., 2 * arch.d_model :].reshape(x.shape[0], H, dh)
    if arch.family == "gpt_neox":
        return block.attention.query_key_value(x).view(x.shape[0], H, 3 * dh)[..., 2 * dh :]
    raise AssertionError(arch.family)


@pytest.mark.parametrize("name", NAMES)
def test_all_sites_match_model_arithmetic(name):
    model = _model(name)
    arch = describe(model)
    acts = _full(name)
    ids, mask = tiny_batch(model)
    assert list(acts) == [f"L{i}.{k}" for i in range(arch.n_layers) for k in KINDS]
    for site_name, t in acts.items():
        site = Site.parse(site_name)
        assert t.shape == (*ids.shape, arch.site_dim(site)), site_name
        assert t.dtype == torch.float32 and not t.requires_grad

    with torch.no_grad():
        for i, blk in enumerate(arch.layers):
            a = {k: acts[f"L{i}.{k}"] for k in KINDS}
            # attention output projection, and its per-head decomposition (paper Sec. 3.1)
            W_O, b_O = arch.output_projection(i)
            bias = torch.zeros(arch.d_model) if b_O is None else b_O
            close(a["attn_out"], a["attn_z"] @ W_O.T + bias)
            heads = per_head_outputs(a["attn_z"], W_O, arch.n_heads)
            assert heads.shape == (*ids.shape, arch.n_heads, arch.d_model)
            close(heads.sum(-2) + bias, a["attn_out"])
            if arch.causal:
                z0 = a["attn_z"][:, 0].reshape(-1, arch.n_heads, arch.d_head)
                close(z0, _v_at_first_position(arch, blk, a["attn_in"]))

            if arch.family == "llama":
                close(a["attn_in"], blk.input_layernorm(a["resid_pre"]))
                if arch.model_type in ("gemma2", "gemma3_text"):  # sandwich norms around each branch
                    mid = a["resid_pre"] + blk.post_attention_layernorm(a["attn_out"])
                    close(a["mlp_in"], blk.pre_feedforward_layernorm(mid))
                    close(a["resid_post"], mid + blk.post_feedforward_layernorm(a["mlp_out"]))
                else:
                    close(a["mlp_in"], blk.post_attention_layernorm(a["resid_pre"] + a["attn_out"]))
                    close(a["resid_post"], a["resid_pre"] + a["attn_out"] + a["mlp_out"])
                mlp = blk.mlp
                close(a["mlp_hidden"], mlp.act_fn(mlp.gate_proj(a["mlp_in"])) * mlp.up_proj(a["mlp_in"]))
                close(a["mlp_out"], mlp.down_proj(a["mlp_hidden"]))
            elif arch.family == "gpt2":
                close(a["attn_in"], blk.ln_1(a["resid_pre"]))
                close(a["mlp_in"], blk.ln_2(a["resid_pre"] + a["attn_out"]))
                close(a["resid_post"], a["resid_pre"] + a["attn_out"] + a["mlp_out"])
                close(a["mlp_hidden"], blk.mlp.act(blk.mlp.c_fc(a["mlp_in"])))
                close(a["mlp_out"], blk.mlp.c_proj(a["mlp_hidden"]))
            elif arch.family == "gpt_neox":
                close(a["attn_in"], blk.input_layernorm(a["resid_pre"]))
                if arch.parallel_residual:  # both branches read resid_pre
                    close(a["mlp_in"], blk.post_attention_layernorm(a["resid_pre"]))
                else:
                    close(a["mlp_in"], blk.post_attention_layernorm(a["resid_pre"] + a["attn_out"]))
                close(a["resid_post"], a["resid_pre"] + a["attn_out"] + a["mlp_out"])
                close(a["mlp_hidden"], blk.mlp.act(blk.mlp.dense_h_to_4h(a["mlp_in"])))
                close(a["mlp_out"], blk.mlp.dense_4h_to_h(a["mlp_hidden"]))
            else:  # bert, post-LN
                close(a["attn_in"], a["resid_pre"])
                close(a["mlp_in"], blk.attention.output.LayerNorm(a["resid_pre"] + a["attn_out"]))
                close(a["mlp_hidden"], blk.intermediate(a["mlp_in"]))
                close(a["mlp_out"], blk.output.dense(a["mlp_hidden"]))
                close(a["resid_post"], blk.output.LayerNorm(a["mlp_in"] + a["mlp_out"]))

            if i + 1 < arch.n_layers:
                assert torch.equal(acts[f"L{i + 1}.resid_pre"], a["resid_post"])


@pytest.mark.parametrize("name", NAMES)
def test_residual_stream_matches_hf_hidden_states(name):
    """HF hidden_states[i] is the input of layer i; the last entry is replaced by last_hidden_state, which has the
    final norm applied (none for BERT)."""
    model = _model(name)
    arch = describe(model)
    acts = _full(name)
    ids, mask = tiny_batch(model)
    with torch.no_grad():
        out = arch.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        hs = out.hidden_states
        assert len(hs) == arch.n_layers + 1
        for i in range(arch.n_layers):
            close(acts[f"L{i}.resid_pre"], hs[i])
        for i in range(arch.n_layers - 1):
            close(acts[f"L{i}.resid_post"], hs[i + 1])
        last = acts[f"L{arch.n_layers - 1}.resid_post"]
        final = last if arch.final_norm is None else arch.final_norm(last)
        close(final, hs[-1])
        close(final, out.last_hidden_state)


# ---- early stop ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_early_stop_runs_nothing_after_the_deepest_site(name):
    model = _model(name)
    arch = describe(model)
    ids, mask = tiny_batch(model)
    calls: dict[str, int] = {}

    def counter(key):
        def hook(*_):
            calls[key] = calls.get(key, 0) + 1

        return hook

    watched = {
        "layer0": arch.layers[0],
        "layer1": arch.layers[1],
        "layer0_mlp_in": arch.hook_point(Site(0, "mlp_in"))[0],  # the next thing after attn_out in layer 0
    }
    if arch.final_norm is not None:
        watched["final_norm"] = arch.final_norm
    head = model.get_output_embeddings()
    if head is not None:
        watched["lm_head"] = head
    if getattr(arch.base_model, "pooler", None) is not None:
        watched["pooler"] = arch.base_model.pooler
    handles = [m.register_forward_pre_hook(counter(k)) for k, m in watched.items()]
    try:
        got = Capturer(model, "L0.attn_out")(ids, mask)
    finally:
        for h in handles:
            h.remove()
    assert calls == {"layer0": 1}
    assert list(got) == ["L0.attn_out"]
    assert torch.equal(got["L0.attn_out"], _full(name)["L0.attn_out"])


def test_early_stop_several_sites_one_forward():
    model = _model("llama")
    arch = describe(model)
    ids, mask = tiny_batch(model)
    calls = []
    h = arch.layers[2].register_forward_pre_hook(lambda *_: calls.append(2))
    h2 = arch.layers[1].register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        got = Capturer(model, [Site(1, "mlp_out"), "L0.attn_in", "L1.attn_z"])(ids, mask)
    finally:
        h.remove()
        h2.remove()
    assert calls == [1]
    assert list(got) == ["L0.attn_in", "L1.attn_z", "L1.mlp_out"]
    for k, v in got.items():
        assert torch.equal(v, _full("llama")[k])


# ---- padding -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_padding_does_not_change_real_positions(name):
    model = _model(name)
    ids, mask = tiny_batch(model)  # row 1 has padding at the end
    batch = _full(name)
    n_real = int(mask[1].sum())
    cap = Capturer(model, "L*.*")
    alone = cap(ids[1:, :n_real])  # no padding, no mask
    first = cap(ids[:1], mask[:1])
    for k in batch:
        close(batch[k][1, :n_real], alone[k][0])
        close(batch[k][0], first[k][0])


# ---- hook hygiene --------------------------------------------------------------------------------------------------


def test_hooks_removed_after_capture_and_after_errors():
    model = _model("gpt2")
    arch = describe(model)
    ids, mask = tiny_batch(model)
    before = _count_hooks(model)
    Capturer(model, "L*.*")(ids, mask)
    assert _count_hooks(model) == before
    Capturer(model, "L0.resid_pre")(ids, mask)  # stops in a pre-hook
    assert _count_hooks(model) == before

    def boom(*_):
        raise ValueError("boom")

    h = arch.layers[1].register_forward_pre_hook(boom)
    try:
        with pytest.raises(ValueError, match="boom"):
            Capturer(model, "L0.attn_out,L2.mlp_out")(ids, mask)
    finally:
        h.remove()
    assert _count_hooks(model) == before
    with pytest.raises(IndexError):  # token id out of the vocabulary: fails inside the embedding
        Capturer(model, "L1.attn_out")(ids + 1000, mask)
    assert _count_hooks(model) == before
    # still works afterwards
    close(Capturer(model, "L2.mlp_out")(ids, mask)["L2.mlp_out"], _full("gpt2")["L2.mlp_out"])


def test_context_manager_keeps_hooks_for_many_calls_and_removes_them():
    model = _model("llama")
    arch = describe(model)
    ids, mask = tiny_batch(model)
    before = _count_hooks(model)
    cap = Capturer(model, "L0.attn_in,L1.attn_out")
    with cap as capture:
        assert capture is cap
        registered = _count_hooks(model)
        assert registered == before + 2
        for _ in range(2):
            got = capture(ids, mask)
            assert _count_hooks(model) == registered
            for k, v in got.items():
                assert torch.equal(v, _full("llama")[k])
        # other forwards of the model inside the block run to the end, untouched by the inert hooks
        with torch.no_grad():
            out = arch.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        close(out, arch.final_norm(_full("llama")["L2.resid_post"]))
        with pytest.raises(RuntimeError, match="already active"), cap:
            pass
    assert _count_hooks(model) == before
    with pytest.raises(ValueError, match="inside"), cap:
        raise ValueError("inside")
    assert _count_hooks(model) == before


def test_capturer_rejects_bad_sites():
    model = _model("llama")
    with pytest.raises(RanklensError, match=r"L3\.attn_out is out of range: the model has 3 layers"):
        Capturer(model, [Site(3, "attn_out")])
    with pytest.raises(RanklensError, match="layer 5 .* has 3 layers"):
        Capturer(model, "L5.attn_out")
    with pytest.raises(RanklensError, match="no sites requested"):
        Capturer(model, [])
    with pytest.raises(RanklensError, match="expected a Site or a site name"):
        Capturer(model, [3])


# ---- dtypes and grad modes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt2", "gpt_neox", "bert"])
def test_bf16_capture(name):
    model = tiny_model(name, dtype=torch.bfloat16)
    ids, mask = tiny_batch(model)
    got = Capturer(model, "L*.*")(ids, mask)
    ref = _full(name)
    for k, v in got.items():
        assert v.dtype == torch.bfloat16
        err = (v.float() - ref[k]).norm() / ref[k].norm()
        assert err < 0.05, (k, float(err))


def test_inference_mode_off_gives_autograd_usable_tensors():
    model = _model("llama")
    ids, mask = tiny_batch(model)
    got = capture(model, "L1.attn_out", ids, mask, inference_mode=False)["L1.attn_out"]
    assert not got.is_inference()
    W = torch.randn(got.shape[-1], 3, requires_grad=True)
    (got @ W).square().sum().backward()
    assert W.grad is not None
    assert capture(model, "L1.attn_out", ids, mask)["L1.attn_out"].is_inference()


# ---- truncated forward ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt2", "gpt_neox", "bert_mlm"])
def test_truncated_forward_equals_resid_post_and_restores_model(name):
    model = _model(name)
    arch = describe(model)
    ids, mask = tiny_batch(model)
    before = [id(m) for m in model.modules()]
    for last in range(arch.n_layers):
        out = truncated_forward(model, ids, mask, last)
        close(out, _full(name)[f"L{last}.resid_post"])
    assert [id(m) for m in model.modules()] == before
    assert describe(model).n_layers == arch.n_layers
    close(truncated_forward(model, ids, mask), _full(name)[f"L{arch.n_layers - 1}.resid_post"])
    with pytest.raises(RanklensError, match="out of range"):
        truncated_forward(model, ids, mask, arch.n_layers)
