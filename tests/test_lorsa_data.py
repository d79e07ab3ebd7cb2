"""Whole-sequence batches for Lorsa from a store and on the fly: contents against the store / a capture written out,
exact resume at any step, step counts, and the Lorsa splice against a manual hook."""

from __future__ import annotations

import functools

import pytest
import torch

from ranklens.data.collect import CollectConfig, collect
from ranklens.data.sequences import StoreSequences, StreamSequences, group_by_tokens
from ranklens.data.tokenize import TokenBatch
from ranklens.dictionaries.lorsa import Lorsa, LorsaConfig
from ranklens.dictionaries.lorsa_init import init_default_
from ranklens.eval.lm_loss import cross_entropies, spliced_lm_loss
from ranklens.lm.attention import mhsa_weights
from ranklens.lm.capture import capture
from ranklens.lm.load import load_model
from ranklens.lm.sites import Site, describe
from ranklens.lm.splice import SequenceSplice
from tiny_models import tiny_batch, tiny_model


@functools.cache
def _lm(model_dir: str):
    return load_model(model_dir, "float32")


@pytest.fixture(scope="module")
def store(tiny_dir, tmp_path_factory):
    cfg = CollectConfig(model=str(tiny_dir / "model"), sites="L1.attn_in,L1.attn_out", corpus=str(tiny_dir / "corpus"),
                        tokens=3000, context_length=48, dtype="float32", shard_tokens=1000)
    return collect(cfg, tmp_path_factory.mktemp("store") / "s", progress=False, lm=_lm(str(tiny_dir / "model")))


def test_group_by_tokens():
    groups = list(group_by_tokens([3, 4, 1, 5, 2, 2, 9, 1], int, 6))
    assert groups == [[3, 4], [1, 5], [2, 2, 9]]  # the incomplete [1] is dropped


def test_store_batches_are_the_stores_sequences_in_order(store):
    source = StoreSequences(store, 1, batch_tokens=400, seed=3, tokens=2500)
    seqs = list(store.sequences(["L1.attn_in", "L1.attn_out"], 1, seed=3))
    # Steps by hand: consecutive sequences closed at >= 400 tokens, as many batches as fit in 2500 tokens.
    sizes, held = [], 0
    for sb in seqs:
        held += int(sb.stat_mask.sum())
        if held >= 400:
            sizes, held = [*sizes, held], 0
    cum = torch.tensor(sizes).cumsum(0)
    assert source.total_steps == int((cum <= 2500).sum()) >= 4
    batches = [b for b, _ in zip(source(0), range(source.total_steps), strict=False)]
    i = 0
    tokens = 0
    for b in batches:
        assert b.n_tokens >= 400 and b.x.shape == b.target.shape
        tokens += b.n_tokens
        for r in range(b.x.shape[0]):
            sb = seqs[i]
            n = int(sb.lengths[0])
            assert int(b.attention_mask[r].sum()) == n and not b.attention_mask[r, n:].any()
            assert torch.equal(b.x[r, :n], sb.acts["L1.attn_in"][0, :n])
            assert torch.equal(b.target[r, :n], sb.acts["L1.attn_out"][0, :n])
            assert torch.equal(b.stat_mask[r, :n], sb.stat_mask[0, :n]) and not b.stat_mask[r, 0]
            assert (b.x[r, n:] == 0).all()
            i += 1
    assert tokens <= 2500


def test_store_source_resumes_exactly_across_epochs(store):
    source = StoreSequences(store, 1, batch_tokens=500, seed=1, tokens=3 * store.n_tokens)  # three epochs
    per_epoch = len(source._cheap_groups(0))
    assert source.total_steps > 2 * per_epoch
    whole = [b for b, _ in zip(source(0), range(source.total_steps), strict=False)]
    for start in (1, per_epoch, per_epoch + 2):
        tail = [b for b, _ in zip(source(start), range(source.total_steps - start), strict=False)]
        assert len(tail) == source.total_steps - start
        for a, b in zip(whole[start:], tail, strict=True):
            assert torch.equal(a.x, b.x) and torch.equal(a.stat_mask, b.stat_mask)
    assert not torch.equal(whole[0].x[0], whole[per_epoch].x[0])  # the next epoch is reshuffled


def test_stream_batches_equal_a_capture_and_resume(tiny_dir):
    lm = _lm(str(tiny_dir / "model"))
    source = StreamSequences(lm, 1, str(tiny_dir / "corpus"), seed=2, context_length=48, batch_tokens=300,
                             tokens=1500)
    assert 1 <= source.total_steps <= 5 and source.docs_consumed > 0
    whole = [b for b, _ in zip(source(0), range(source.total_steps), strict=False)]
    assert sum(b.n_tokens for b in whole) <= 1500
    b = whole[1]
    acts = capture(lm.model, "L1.attn_in,L1.attn_out", *_ids(source, 1))
    torch.testing.assert_close(acts["L1.attn_in"], b.x)
    torch.testing.assert_close(acts["L1.attn_out"], b.target)
    for start in (1, 2):
        tail = [b for b, _ in zip(source(start), range(source.total_steps - start), strict=False)]
        for a, c in zip(whole[start:], tail, strict=True):
            assert torch.equal(a.x, c.x) and torch.equal(a.stat_mask, c.stat_mask)


def _ids(source: StreamSequences, step: int):
    group = next(g for i, g in enumerate(source._groups()) if i == step)
    seqs = [ids for ids, _, _ in group]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), source.special.pad_id)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s)
        mask[r, : len(s)] = 1
    return ids, mask


# ---- the Lorsa splice -----------------------------------------------------------------------------------------------


def test_lorsa_splice_equals_a_manual_hook():
    model = tiny_model("llama")
    arch = describe(model)
    ids, mask = tiny_batch(model, batch=3, seq=10, pad=4)
    stat = mask.bool().clone()
    stat[:, 0] = False
    batch = TokenBatch(ids, mask, stat, mask.sum(1), n_docs=3)
    w = mhsa_weights(model, 1)
    lorsa = init_default_(Lorsa(LorsaConfig.from_mhsa(w, n_heads=32, n_qk_groups=8, k=6, dtype=torch.float32)),
                          torch.Generator().manual_seed(0))
    with torch.no_grad():
        lorsa.W_V.mul_(20)

    def replacement(x, attention_mask):
        return lorsa(x, attention_mask).out

    site = Site(1, "attn_out")
    spliced = cross_entropies(model, arch, [batch], site,
                              {"s": SequenceSplice(Site(1, "attn_in"), replacement)})["s"]
    # By hand: Lorsa's output from a separate capture of attn_in, written into o_proj's output with a plain hook.
    x = capture(model, "L1.attn_in", ids, mask)["L1.attn_in"]
    with torch.no_grad():
        y = lorsa(x, mask).out

    def hook(module, args, output):
        out = output.clone()
        out[stat] = y[stat]
        return out

    handle = arch.layers[1].self_attn.o_proj.register_forward_hook(hook)
    try:
        manual = cross_entropies(model, arch, [batch], None, {"m": None})["m"]
    finally:
        handle.remove()
    assert spliced == pytest.approx(manual, rel=1e-6)
    clean = cross_entropies(model, arch, [batch], None, {"c": None})["c"]
    assert abs(spliced - clean) > 1e-4  # the splice did something
    metrics = spliced_lm_loss(model, arch, [batch], site, SequenceSplice(Site(1, "attn_in"), replacement))
    assert metrics["ce_spliced"] == pytest.approx(manual, rel=1e-6) and "loss_recovered" in metrics
