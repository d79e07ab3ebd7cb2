"""Documents -> token sequences -> padded batches, as in App. E.2 of the dimensional-collapse paper.

Each document is truncated to a context length (default 1024) and a bos token is prepended where the model has
one (BERT-style encoders get their [CLS] ... [SEP] frame instead). That truncation is the paper's (App. E.2) and
the default. With ``split=True`` a long document is cut into consecutive context-length pieces instead, each framed
the same way, so every token of it is used (a 42 KB .txt file is one document: truncated it gives ~1,000 tokens).
Pre-tokenized documents (lists of token ids, from an ``input_ids`` column) are used as they are: no tokenizer and
no added frame, only the truncation or the split at context_length. A `stat_mask` marks the positions that count
as tokens: bos, eos and pad positions (and [CLS]/[SEP]) are excluded from every statistic and every training set.
The order is the corpus order, which is deterministic given the corpus seed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from ranklens.config import DEFAULT_CONTEXT_LENGTH
from ranklens.errors import RanklensError


@dataclass(frozen=True)
class SpecialTokens:
    """The ids that frame a sequence and the ids that never count as tokens."""

    prefix: tuple[int, ...]  # prepended to every document (bos, or [CLS])
    suffix: tuple[int, ...]  # appended (encoders' [SEP]); empty for causal LMs
    excluded: frozenset[int]  # bos, eos, pad (and cls/sep): masked out of statistics
    pad_id: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> SpecialTokens:
        bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        cls_id, sep = getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)
        if bos is None and cls_id is not None:  # BERT-style encoder: [CLS] text [SEP]
            prefix, suffix = (cls_id,), (sep,) if sep is not None else ()
        else:
            prefix, suffix = ((bos,) if bos is not None else ()), ()
        excluded = frozenset(i for i in (bos, eos, pad, cls_id, sep) if i is not None)
        pad_id = pad if pad is not None else (eos if eos is not None else 0)
        return cls(prefix=prefix, suffix=suffix, excluded=excluded, pad_id=pad_id)


@dataclass
class TokenBatch:
    """Right-padded sequences. `n_docs` counts the corpus documents consumed to build this batch."""

    input_ids: torch.Tensor  # [B, T] int64
    attention_mask: torch.Tensor  # [B, T] int64, 1 at real positions (bos included)
    stat_mask: torch.Tensor  # [B, T] bool, True at positions that count as tokens
    lengths: torch.Tensor  # [B] int64
    n_docs: int

    @property
    def n_tokens(self) -> int:
        return int(self.stat_mask.sum())


def token_sequences(documents: Iterable[str | list[int]], tokenizer,
                    context_length: int = DEFAULT_CONTEXT_LENGTH, split: bool = False,
                    ) -> Iterator[tuple[list[int], int]]:
    """Yield (ids, n_docs_consumed) per sequence: each document framed by the special tokens and truncated to
    context_length, or (split) cut into consecutive pieces of that length. n_docs_consumed counts the documents
    read so far, a split document from its first piece on: text held out after them (the documents from that count
    on) never shares a document with what was read. (Resuming a split corpus therefore goes by batches, not by
    documents: see ranklens.data.collect and ranklens.spectrum.job.)

    Documents that tokenize to nothing are consumed but yield no sequence.
    """
    special = SpecialTokens.from_tokenizer(tokenizer)
    room = context_length - len(special.prefix) - len(special.suffix)
    if room < 1:
        raise RanklensError(f"context length {context_length} leaves no room for text; expected at least "
                            f"{len(special.prefix) + len(special.suffix) + 1}")
    consumed = 0
    for chunk in _chunks(documents, 64):  # the fast tokenizer is much faster on batches
        texts = [d for d in chunk if isinstance(d, str)]
        encoded = iter(tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else [])
        for doc in chunk:
            if isinstance(doc, str):  # we frame and truncate ourselves
                ids, prefix, suffix, width = next(encoded), list(special.prefix), list(special.suffix), room
            else:  # pre-tokenized: as it is
                ids, prefix, suffix, width = doc, [], [], context_length
            starts = range(0, len(ids), width) if split else range(0, min(len(ids), 1))
            for start in starts:
                yield [*prefix, *ids[start:start + width], *suffix], consumed + 1
            consumed += 1


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def token_batches(documents: Iterable[str | list[int]], tokenizer, context_length: int = DEFAULT_CONTEXT_LENGTH,
                  batch_tokens: int = 8192, split: bool = False) -> Iterator[TokenBatch]:
    """Group consecutive sequences into batches whose padded size B x T_max stays within batch_tokens.

    A batch always holds at least one sequence. Order is preserved, so a run is reproducible and resumable by
    skipping the documents an earlier run consumed. A batch's `n_docs` counts the documents it starts; with
    `split`, the pieces of a long document can spread over several batches, and it is counted in the first.
    """
    special = SpecialTokens.from_tokenizer(tokenizer)
    pending: list[list[int]] = []
    docs_at_last_batch = 0
    docs_before = docs_seen = 0  # documents completed before / through the current sequence
    for ids, docs_seen in token_sequences(documents, tokenizer, context_length, split):
        longest = max([len(ids), *(len(p) for p in pending)])
        if pending and longest * (len(pending) + 1) > batch_tokens:
            yield _pad(pending, special, docs_before - docs_at_last_batch)
            docs_at_last_batch = docs_before
            pending = []
        pending.append(ids)
        docs_before = docs_seen
    if pending:
        yield _pad(pending, special, docs_seen - docs_at_last_batch)


def _pad(sequences: list[list[int]], special: SpecialTokens, n_docs: int) -> TokenBatch:
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.int64)
    width = int(lengths.max())
    input_ids = torch.full((len(sequences), width), special.pad_id, dtype=torch.int64)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
    attention_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    excluded = torch.tensor(sorted(special.excluded), dtype=torch.int64)
    stat_mask = attention_mask.bool() & ~torch.isin(input_ids, excluded)
    return TokenBatch(input_ids, attention_mask, stat_mask, lengths, n_docs)


def first_tokens(batches: Iterable[TokenBatch], n_tokens: int, *, predictions: bool = False) -> list[TokenBatch]:
    """``take_tokens`` as a list."""
    return list(take_tokens(batches, n_tokens, predictions=predictions))


def take_tokens(batches: Iterable[TokenBatch], n_tokens: int, *, predictions: bool = False) -> Iterator[TokenBatch]:
    """The leading sequences of `batches` that hold exactly `n_tokens` tokens (fewer only if they run out).

    With ``predictions`` the count is of next-token predictions, the pairs (t, t+1) of counted positions the LM
    loss scores, so ``--lm-eval-tokens N`` scores N predictions. The last batch is cut after the sequence that
    reaches the count, and that sequence's positions past the count leave ``stat_mask`` (the model still sees
    them, so no activation before them changes, encoders included).
    """
    seen = 0
    for batch in batches:
        if seen >= n_tokens:
            return
        counted = _prediction_targets(batch.stat_mask) if predictions else batch.stat_mask
        cumulative = counted.sum(1).cumsum(0)
        need = n_tokens - seen
        if int(cumulative[-1]) > need:
            rows = int(torch.searchsorted(cumulative, need)) + 1  # the first row whose count reaches `need`
            width = int(batch.lengths[:rows].max())
            keep = need - (int(cumulative[rows - 2]) if rows > 1 else 0)  # counted positions wanted from that row
            stat = batch.stat_mask[:rows, :width].clone()
            last = int(counted[rows - 1].nonzero()[keep - 1, 0])
            stat[rows - 1, last + 1:] = False
            batch = TokenBatch(batch.input_ids[:rows, :width], batch.attention_mask[:rows, :width], stat,
                               batch.lengths[:rows], batch.n_docs)
        yield batch
        seen += int((_prediction_targets(batch.stat_mask) if predictions else batch.stat_mask).sum())


def lm_predictions(batches: Iterable[TokenBatch]) -> int:
    """The next-token predictions the LM loss scores over `batches` (see ``take_tokens``)."""
    return sum(int(_prediction_targets(b.stat_mask).sum()) for b in batches)


def _prediction_targets(stat_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: True at position t+1 where (t, t+1) is a scored next-token pair (both positions counted)."""
    targets = torch.zeros_like(stat_mask)
    targets[:, 1:] = stat_mask[:, :-1] & stat_mask[:, 1:]
    return targets
