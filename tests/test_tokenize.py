"""Tokenization as in App. E.2: truncation, bos, the stat mask, batching by a token budget."""

import pytest
import torch

from ranklens.data.tokenize import SpecialTokens, token_batches, token_sequences
from ranklens.errors import RanklensError

DOCS = ["The cat sat on the mat.", "", "A much longer document " * 200, "Short one.", "def f(x):\n    return x\n"]


def test_bos_prepended_and_truncated(smollm2):
    tok = smollm2.tokenizer
    seqs = list(token_sequences(DOCS, tok, context_length=32))
    assert [consumed for _, consumed in seqs] == [1, 3, 4, 5]  # empty documents are consumed, not yielded
    for ids, _ in seqs:
        assert ids[0] == tok.bos_token_id and len(ids) <= 32
    assert len(seqs[1][0]) == 32
    assert seqs[0][0][1:] == tok(DOCS[0], add_special_tokens=False)["input_ids"]


def test_encoder_framing(minilm):
    tok = minilm.tokenizer
    (ids, _), = token_sequences(["hello world"], tok, context_length=16)
    assert ids == tok("hello world")["input_ids"]  # [CLS] hello world [SEP]
    special = SpecialTokens.from_tokenizer(tok)
    assert {tok.cls_token_id, tok.sep_token_id, tok.pad_token_id} <= special.excluded


def test_batches_mask_and_budget(smollm2):
    tok = smollm2.tokenizer
    batches = list(token_batches(DOCS * 3, tok, context_length=64, batch_tokens=128))
    assert sum(b.n_docs for b in batches) == len(DOCS) * 3
    special = SpecialTokens.from_tokenizer(tok)
    for b in batches:
        B, T = b.input_ids.shape
        assert B * T <= 128 or B == 1
        assert torch.equal(b.attention_mask.sum(1), b.lengths)
        assert not b.stat_mask[:, 0].any()  # bos never counts
        real = b.attention_mask.bool()
        assert not b.stat_mask[~real].any()  # padding never counts
        is_special = torch.isin(b.input_ids, torch.tensor(sorted(special.excluded)))
        assert torch.equal(b.stat_mask, real & ~is_special)
    total = sum(b.n_tokens for b in batches)
    expected = sum(len(ids) - 1 for ids, _ in token_sequences(DOCS * 3, tok, context_length=64))
    assert total == expected


def test_deterministic(smollm2):
    a = [b.input_ids for b in token_batches(DOCS, smollm2.tokenizer, 64, 256)]
    b = [b.input_ids for b in token_batches(DOCS, smollm2.tokenizer, 64, 256)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_context_too_short(minilm):
    with pytest.raises(RanklensError, match="context length 2"):
        list(token_sequences(["x"], minilm.tokenizer, context_length=2))


def _naive_first(batches, n, predictions):
    """Row-major list of the (batch, row, position) counted positions, the first n of them."""
    found = []
    for b, batch in enumerate(batches):
        stat = batch.stat_mask
        for r in range(stat.shape[0]):
            for t in range(stat.shape[1]):
                counted = stat[r, t] and (not predictions or (t > 0 and stat[r, t - 1]))
                if counted:
                    found.append((b, r, t))
    return found[:n]


@pytest.mark.parametrize("predictions", [False, True])
def test_first_tokens_delivers_exactly_n(smollm2, predictions):
    from ranklens.data.tokenize import _prediction_targets, first_tokens

    batches = list(token_batches(DOCS * 4, smollm2.tokenizer, context_length=64, batch_tokens=512))
    for n in (1, 10, 100, 150, 337):
        taken = first_tokens(iter(batches), n, predictions=predictions)
        counted = [_prediction_targets(b.stat_mask) if predictions else b.stat_mask for b in taken]
        got = [(b, int(r), int(t)) for b, c in enumerate(counted) for r, t in c.nonzero().tolist()]
        assert got == _naive_first(batches, n, predictions)  # exactly the first n, in corpus order
        for b, batch in enumerate(taken):  # ids untouched: the model sees the same text
            rows, width = batch.input_ids.shape
            assert torch.equal(batch.input_ids, batches[b].input_ids[:rows, :width])
    everything = sum(b.n_tokens for b in batches)
    assert sum(b.n_tokens for b in first_tokens(iter(batches), 10**9)) == everything
