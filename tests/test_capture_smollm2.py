"""Capture on the embedded SmolLM2 against hand-written forward hooks on the same modules."""

import torch

from ranklens.data.tokenize import token_batches
from ranklens.lm.capture import Capturer
from ranklens.lm.sites import describe, per_head_outputs

TEXT = ["The quick brown fox jumps over the lazy dog. " * 8, "def add(a, b):\n    return a + b\n" * 4]


def test_capture_equals_hand_written_hooks(smollm2):
    model = smollm2.model
    batch = next(token_batches(TEXT, smollm2.tokenizer, context_length=64, batch_tokens=4096))
    seen = {}
    layer = model.model.layers[7]
    handles = [
        layer.self_attn.o_proj.register_forward_hook(lambda m, a, out: seen.setdefault("attn_out", out.clone())),
        layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("attn_z", a[0].clone())),
        layer.mlp.register_forward_hook(lambda m, a, out: seen.setdefault("mlp_out", out.clone())),
        layer.register_forward_hook(lambda m, a, out: seen.setdefault("resid_post", out.clone())),
    ]
    try:
        with torch.no_grad():
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    finally:
        for h in handles:
            h.remove()
    acts = Capturer(model, "L7.attn_z,L7.attn_out,L7.mlp_out,L7.resid_post")(batch.input_ids, batch.attention_mask)
    for kind, expected in seen.items():
        assert torch.equal(acts[f"L7.{kind}"], expected), kind


def test_smollm2_site_arithmetic(smollm2):
    model = smollm2.model
    arch = describe(model)
    assert (arch.family, arch.n_layers, arch.d_model, arch.n_heads, arch.n_kv_heads, arch.d_head) == \
        ("llama", 30, 576, 9, 3, 64)
    batch = next(token_batches(TEXT, smollm2.tokenizer, context_length=64, batch_tokens=4096))
    acts = Capturer(model, "L3.*")(batch.input_ids, batch.attention_mask)
    W_O, bias = arch.output_projection(3)
    assert bias is None
    torch.testing.assert_close(acts["L3.attn_out"], acts["L3.attn_z"] @ W_O.T, rtol=1e-5, atol=1e-5)
    heads = per_head_outputs(acts["L3.attn_z"], W_O, arch.n_heads)
    torch.testing.assert_close(heads.sum(-2), acts["L3.attn_out"], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(acts["L3.resid_post"], acts["L3.resid_pre"] + acts["L3.attn_out"] + acts["L3.mlp_out"],
                               rtol=1e-5, atol=1e-4)
