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
