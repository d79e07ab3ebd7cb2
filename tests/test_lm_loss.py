"""Spliced LM loss against a naive reference: full logits from the model's own forward, masks written out."""

import pytest
import torch
import torch.nn.functional as F

from ranklens.data.tokenize import TokenBatch
from ranklens.errors import RanklensError
from ranklens.eval.lm_loss import cross_entropies, spliced_lm_loss, spliced_metrics
from ranklens.lm.sites import Site, describe
from ranklens.lm.splice import replace_site
from tiny_models import tiny_batch, tiny_model


def _batch(model) -> TokenBatch:
    ids, mask = tiny_batch(model, batch=3, seq=10, pad=4)
    stat = mask.bool().clone()
    stat[:, 0] = False  # bos position
    return TokenBatch(ids, mask, stat, mask.sum(1), n_docs=3)


def _naive_ce(model, batch: TokenBatch) -> float:
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    pairs = batch.stat_mask[:, :-1] & batch.stat_mask[:, 1:]
    return float(F.cross_entropy(logits[:, :-1][pairs], batch.input_ids[:, 1:][pairs]))


@pytest.mark.parametrize("name", ["llama", "gpt2", "gpt_neox", "gemma2"])
def test_clean_ce_matches_model_logits(name):
    model = tiny_model(name)
    batch = _batch(model)
    ce = cross_entropies(model, describe(model), [batch], None, {"clean": None})["clean"]
    assert ce == pytest.approx(_naive_ce(model, batch), rel=1e-5)


@pytest.mark.parametrize("kind", ["attn_out", "attn_z", "resid_pre", "mlp_hidden"])
def test_splice_identity_and_zero(kind):
    model = tiny_model("llama")
    arch = describe(model)
    batch = _batch(model)
    site = Site(1, kind)
    m = spliced_lm_loss(model, arch, [batch], site, lambda x: x)
    assert m["ce_spliced"] == pytest.approx(m["ce_clean"], abs=1e-6)
    assert m["delta_lm_loss"] == pytest.approx(0, abs=1e-6) and m["loss_recovered"] == pytest.approx(1.0, abs=1e-5)

    # Zero ablation written out by hand: zero the site's tensor at the ordinary positions only.
    module, point = arch.hook_point(site)

    def zero_out(t):
        t = t.clone()
        t[batch.stat_mask] = 0
        return t

    if point == "output":
        handle = module.register_forward_hook(lambda mod, a, out: zero_out(out))
    else:
        handle = module.register_forward_pre_hook(
            lambda mod, a, kw: ((zero_out(a[0]), *a[1:]), kw) if a else (a, {**kw, "hidden_states": zero_out(kw["hidden_states"])}),
            with_kwargs=True)
    try:
        expected = _naive_ce(model, batch)
    finally:
        handle.remove()
    assert m["ce_zero_ablation"] == pytest.approx(expected, rel=1e-5)
    assert abs(m["ce_zero_ablation"] - m["ce_clean"]) > 1e-4  # the ablation does change the loss


def test_splice_leaves_special_positions():
    """Hooks run in registration order: one before the splice sees the original, one after sees the result."""
    model = tiny_model("llama")
    arch = describe(model)
    batch = _batch(model)
    site = Site(0, "attn_out")
    module, _ = arch.hook_point(site)
    seen = {}
    before = module.register_forward_hook(lambda mod, a, out: seen.setdefault("before", out.clone()))
    with torch.no_grad(), replace_site(arch, site, lambda x: x + 1.0, batch.stat_mask):
        after = module.register_forward_hook(lambda mod, a, out: seen.setdefault("after", out.clone()))
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    before.remove()
    after.remove()
    expected = seen["before"].clone()
    expected[batch.stat_mask] += 1.0
    assert torch.equal(seen["after"], expected)
    assert len(module._forward_hooks) == 0  # the splice hook is gone


def test_metrics_and_errors():
    m = spliced_metrics(2.0, 2.5, 6.0)
    assert m["delta_lm_loss"] == 0.5 and m["loss_recovered"] == pytest.approx(3.5 / 4.0)
    bert = tiny_model("bert")
    with pytest.raises(RanklensError, match="causal"):
        cross_entropies(bert, describe(bert), [_batch(bert)], None, {"clean": None})


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma2", "gpt2", "gpt_neox", "mistral"])
def test_skip_prefix_equals_full_forward(name):
    """Starting layer L from its captured input gives the full forward's CE, clean and spliced."""
    from ranklens.lm.capture import Capturer
    from ranklens.lm.splice import skip_prefix

    model = tiny_model(name)
    arch = describe(model)
    batch = _batch(model)
    site = Site(2, "attn_out")
    full = {}
    for key, fn in {"clean": None, "double": lambda x: 10 * x + 1}.items():
        if fn is None:
            full[key] = _naive_ce(model, batch)
        else:
            with replace_site(arch, site, fn, batch.stat_mask):
                full[key] = _naive_ce(model, batch)
    got = cross_entropies(model, arch, [batch], site, {"clean": None, "double": lambda x: 10 * x + 1})
    assert got["clean"] == pytest.approx(full["clean"], rel=1e-5)
    assert got["double"] == pytest.approx(full["double"], rel=1e-5)
    assert got["double"] != pytest.approx(got["clean"], rel=1e-4)
    # The layers are restored afterwards.
    resid = Capturer(model, "L2.resid_pre")(batch.input_ids, batch.attention_mask)["L2.resid_pre"]
    before = [id(m) for m in arch.layers]
    with skip_prefix(arch, 2, resid):
        pass
    assert [id(m) for m in arch.layers] == before


# ---- memory that does not grow with the vocabulary -------------------------------------------------------------------


def test_chunk_rows_follow_the_byte_budget():
    from ranklens.eval.lm_loss import LOGIT_BYTES, logit_chunk_rows

    assert logit_chunk_rows(262_144) * 262_144 * 4 <= LOGIT_BYTES
    assert logit_chunk_rows(262_144) == 64 and logit_chunk_rows(49_152) == 341
    assert logit_chunk_rows(10**12) == 1  # never zero rows


def test_chunked_ce_equals_dense_reference_across_many_chunks(monkeypatch):
    """A budget of 3 rows of logits: the sum over chunks equals the dense CE of the model's own logits."""
    import ranklens.eval.lm_loss as lm_loss

    model = tiny_model("llama")
    batch = _batch(model)
    monkeypatch.setattr(lm_loss, "LOGIT_BYTES", 3 * 4 * model.config.vocab_size)
    assert lm_loss.logit_chunk_rows(model.config.vocab_size) == 3
    ce = cross_entropies(model, describe(model), [batch], None, {"clean": None})["clean"]
    assert ce == pytest.approx(_naive_ce(model, batch), rel=1e-6)


_PEAK_SCRIPT = r"""
import json, resource, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from ranklens.data.tokenize import TokenBatch
from ranklens.eval.lm_loss import cross_entropies
from ranklens.lm.sites import Site, describe

torch.manual_seed(0)
vocab, rows = 262_144, 2_400
model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                                     tie_word_embeddings=True)).eval()
ids = torch.randint(0, vocab, (2, rows // 2 + 1))
mask = torch.ones_like(ids)
batch = TokenBatch(ids, mask, mask.bool(), mask.sum(1), n_docs=2)
arch = describe(model)
with torch.inference_mode():  # warm up the forward so the baseline holds its own scratch
    arch.base_model(input_ids=ids[:, :8], attention_mask=mask[:, :8])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ce = cross_entropies(model, arch, [batch], Site(1, "attn_out"), {"clean": None, "zero": torch.zeros_like})
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_mb": (after - before) / 1024, "ce": ce}))
"""


@pytest.mark.slow
def test_spliced_loss_peak_memory_at_262k_vocabulary():
    """Clean and spliced CE over 2,400 positions at Gemma 3's vocabulary (262,144) in a fresh process: the peak
    resident memory grows by less than 400 MB. Row chunks of 2,048 held 2 GiB of float32 logits at once (and as
    much again for the log-softmax); byte chunks of 64 MiB hold 64 rows."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"peak growth {result['peak_mb']:.0f} MB, ce {result['ce']}")
    assert result["peak_mb"] < 400
    assert 11 < result["ce"]["clean"] < 14  # ~log(262144) = 12.5 for a random model: the loss was really formed
