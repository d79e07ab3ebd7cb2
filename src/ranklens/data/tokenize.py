"""Documents -> token sequences -> padded batches, as in App. E.2 of the dimensional-collapse paper.

Each document is truncated to a context length (default 1024) and a bos token is prepended where the model has
one (BERT-style encoders get their [CLS] ... [SEP] frame instead). A `stat_mask` marks the positions that count
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


def token_sequences(documents: Iterable[str], tokenizer, context_length: int = DEFAULT_CONTEXT_LENGTH,
                    ) -> Iterator[tuple[list[int], int]]:
    """Yield (ids, n_docs_consumed) per document: framed by the special tokens and truncated to context_length.

    Documents that tokenize to nothing are consumed but yield no sequence.
    """
    special = SpecialTokens.from_tokenizer(tokenizer)
    room = context_length - len(special.prefix) - len(special.suffix)
    if room < 1:
        raise RanklensError(f"context length {context_length} leaves no room for text; expected at least "
                            f"{len(special.prefix) + len(special.suffix) + 1}")
    consumed = 0
    for chunk in _chunks(documents, 64):  # the fast tokenizer is much faster on batches
        encoded = tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]  # we truncate ourselves
        for ids in encoded:
            consumed += 1
            if ids:
                yield [*special.prefix, *ids[:room], *special.suffix], consumed


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def token_batches(documents: Iterable[str], tokenizer, context_length: int = DEFAULT_CONTEXT_LENGTH,
                  batch_tokens: int = 8192) -> Iterator[TokenBatch]:
    """Group consecutive sequences into batches whose padded size B x T_max stays within batch_tokens.

    A batch always holds at least one sequence. Order is preserved, so a run is reproducible and resumable by
    skipping the documents an earlier run consumed.
    """
    special = SpecialTokens.from_tokenizer(tokenizer)
    pending: list[list[int]] = []
    docs_at_last_batch = 0
    docs_seen = 0
    for ids, docs_seen in token_sequences(documents, tokenizer, context_length):
        longest = max([len(ids), *(len(p) for p in pending)])
        if pending and longest * (len(pending) + 1) > batch_tokens:
            yield _pad(pending, special, docs_seen - 1 - docs_at_last_batch)
            docs_at_last_batch = docs_seen - 1
            pending = []
        pending.append(ids)
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


def first_tokens(batches: Iterable[TokenBatch], n_tokens: int) -> list[TokenBatch]:
    """The leading whole sequences of `batches` that hold at least `n_tokens` tokens (fewer if they run out).

    The last batch is cut after the sequence that reaches the count, so held-out sets are as large as asked,
    not as large as a batch happens to be.
    """
    out: list[TokenBatch] = []
    seen = 0
    for batch in batches:
        per_row = batch.stat_mask.sum(1)
        needed = int(torch.searchsorted(per_row.cumsum(0), n_tokens - seen)) + 1
        if needed < len(per_row):
            width = int(batch.lengths[:needed].max())
            batch = TokenBatch(batch.input_ids[:needed, :width], batch.attention_mask[:needed, :width],
                               batch.stat_mask[:needed, :width], batch.lengths[:needed], batch.n_docs)
        out.append(batch)
        seen += batch.n_tokens
        if seen >= n_tokens:
            break
    return out
